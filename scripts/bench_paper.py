"""Cost of the paper's architectures on this machine: the published GS-Jacobi schedules against
the sequential loop, and training throughput (images/s).

Schedules. With tol = 0 the published iteration caps are fixed counts, so what a schedule costs
does not depend on the weights, and every block of a model has the same architecture. The script
therefore times ONE randomly initialised block per architecture, once per distinct per-block
setting of the schedule (sequential loop; each stacked block's S x J; the "else" Jacobi x J),
and adds the block times up over the T blocks. Batch 1, no guidance, float32; these runs take
seconds to minutes each on a CPU, so each is timed once after a short warm-up (state it when you
quote them).

Training. One optimisation step (forward, backward, AdamW) of the full model per preset at the
given per-device batch, after one warm-up step; images/s = batch / median step time.

    python scripts/bench_paper.py schedules --presets img64_cond img128_cond
    python scripts/bench_paper.py train --presets demo img64_cond --batch 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tarflow.model import TarFlow, preset
from tarflow.model.flow import FlowBlock
from tarflow.sampling import BlockSchedule, gs_jacobi_block, parse_schedule

# The GS-Jacobi paper's best strategies and its speed-ups over its sequential loop (FID within 1%).
PAPER = {
    "img128_cond": ("[6-8-32-10]", 4.53),
    "afhq256_cond": ("[7-8-32-10]", 5.32),
    "img64_uncond": ("[0/6-8-32-20]", 2.96),
    "img64_cond": ("[0/7-256/8-1/13-6]", 2.51),
}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.no_grad()
def schedule_row(name: str, warmup_steps: int) -> str:
    """One table row: sequential vs the paper's schedule on one block of ``name``'s architecture."""
    cfg = preset(name)
    torch.manual_seed(0)
    block = FlowBlock(cfg, 1).eval()
    torch.nn.init.normal_(block.proj_out.weight, std=0.01)  # not the identity
    z = torch.randn(1, cfg.num_patches, cfg.token_dim) * cfg.noise_std
    y = torch.zeros(1, dtype=torch.long) if cfg.conditional else None
    warm = BlockSchedule(cfg.num_patches // 8, warmup_steps, "z", 0.0)
    gs_jacobi_block(block, z, y, warm)  # warm-up: allocator, threads, kernels
    t_seq = _timed(lambda: block.reverse(z, y))
    spec, paper_speedup = PAPER[name]
    schedule = parse_schedule(spec, tol=0.0)
    cost = {}
    for s in {schedule.for_block(b) for b in range(cfg.num_blocks)}:
        if s.is_sequential(cfg.num_patches):
            cost[s] = t_seq
        else:
            cost[s] = _timed(lambda s=s: gs_jacobi_block(block, z, y, s))
    total = sum(cost[schedule.for_block(b)] for b in range(cfg.num_blocks))
    seq_total = t_seq * cfg.num_blocks
    detail = "; ".join(f"S{s.segments}xJ{s.max_iters}: {c:.1f}" for s, c in cost.items())
    return (f"| {name} | {cfg.tag} | {cfg.num_patches} | {seq_total:.1f} | `{spec}` | "
            f"{total:.1f} | {seq_total / total:.2f}x | {paper_speedup:.2f}x | "
            f"seq: {t_seq:.1f}; {detail} |")


def train_row(name: str, batch: int, steps: int) -> str:
    """One table row: median seconds of a full training step of preset ``name``."""
    cfg = preset(name)
    torch.manual_seed(0)
    model = TarFlow(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, cfg.in_channels, cfg.img_size, cfg.img_size)
    y = torch.randint(0, cfg.num_classes, (batch,)) if cfg.conditional else None

    def step():
        opt.zero_grad(set_to_none=True)
        model.nll(x + cfg.noise_std * torch.randn_like(x), y).mean().backward()
        opt.step()

    step()  # warm-up (also allocates the optimizer state)
    sec = statistics.median(_timed(step) for _ in range(steps))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return f"| {name} | {cfg.tag} | {params:.0f} | {batch} | {sec:.2f} | {batch / sec:.2f} |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["schedules", "train"])
    p.add_argument("--presets", nargs="+")
    p.add_argument("--batch", type=int, default=2, help="per-device batch (train)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (train)")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU")
    if args.what == "schedules":
        print("| preset | tag | N | sequential s | schedule | schedule s | speed-up | paper's "
              "speed-up | per-block s (setting: s) |\n|---|---|---|---|---|---|---|---|---|")
        for name in args.presets or list(PAPER):
            print(schedule_row(name, args.warmup_steps), flush=True)
    else:
        print("| preset | tag | params (M) | batch | s/step | images/s |\n" + "|---" * 6 + "|")
        for name in args.presets or ["demo", *PAPER]:
            print(train_row(name, args.batch, args.steps), flush=True)


if __name__ == "__main__":
    main()
