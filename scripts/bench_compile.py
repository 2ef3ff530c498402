"""torch.compile against eager on this machine: sampling's network passes and a training step.

Sampling. ``FlowBlock.predict`` is the one network call every sampler makes: the sequential loop
calls it on one token with the KV cache (N - 1 steps per block), a Jacobi iteration on a run of
tokens from the convergence frontier on (its length, the start position and, as samples
converge and leave, the batch change from call to call: hence ``dynamic=True``). Per batch size
the script times, on the checkpoint's weights and the same noise and labels:

* ``seq step``: one sequential step (a whole block's loop / (N - 1)), block T-1;
* ``jacobi pass``: one full-length pass (B, N, D) with the cache, block T-1;
* ``sample seq`` / ``sample jacobi``: the whole sampler (all blocks; Jacobi at ``--tol``),

eager against every block's ``predict`` replaced by ``torch.compile(block.predict)``, round-robin
in one process (one call of each per round, the order rotating), medians. Compile time is the
first compiled call minus a warm eager call.

Training. One optimiser step (forward, backward, AdamW) at ``--train-batch`` with the flow
blocks compiled as ``module.compile=true`` does (``nn.Module.compile`` per block), against eager,
round-robin; compile time is the first compiled step minus an eager step.

    python scripts/bench_compile.py CKPT --batch 1 16 --train-batch 64
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch._dynamo

from tarflow.eval.bench import compiled_copy, interleaved_medians
from tarflow.model import TarFlow
from tarflow.sampling import SamplingSchedule, sample


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.no_grad()
def sampling_rows(net: TarFlow, batch: int, args) -> list[str]:
    cfg = net.config
    gen = torch.Generator().manual_seed(0)
    noise = net.sample_noise(batch, generator=gen)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=gen) if cfg.conditional else None
    jacobi = SamplingSchedule.jacobi(init="z", tol=args.tol)
    seq = SamplingSchedule.sequential()
    options = {"backend": args.backend, "mode": args.mode, "dynamic": True}
    nets = {"eager": net, "compiled": compiled_copy(net, **options)}
    b = cfg.num_blocks - 1
    x = noise.clone()
    cond = net.blocks[b].class_bias(y)

    def seq_block(n: TarFlow):
        block = n.blocks[b]
        cache = block.new_cache(batch, dtype=x.dtype, device=x.device)
        for i in range(cfg.num_patches - 1):
            block.predict(x[:, i:i + 1], cond=cond, start=i, cache=cache)

    def jacobi_pass(n: TarFlow):
        block = n.blocks[b]
        block.predict(x, cond=cond, start=0, cache=block.new_cache(batch, dtype=x.dtype,
                                                                    device=x.device))

    calls = {}
    for name, n in nets.items():
        calls[f"seq step/{name}"] = lambda n=n: seq_block(n)
        calls[f"jacobi pass/{name}"] = lambda n=n: jacobi_pass(n)
        calls[f"sample seq/{name}"] = lambda n=n: sample(n, noise, y, seq)
        calls[f"sample jacobi/{name}"] = lambda n=n: sample(n, noise, y, jacobi)
    # Compile time: the first compiled call of each kind against a warm eager call.
    compile_s = {}
    for kind in ("seq step", "jacobi pass", "sample seq", "sample jacobi"):
        calls[f"{kind}/eager"]()
        eager = _timed(calls[f"{kind}/eager"])
        compile_s[kind] = _timed(calls[f"{kind}/compiled"]) - eager
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    medians, _ = interleaved_medians(calls, repeats=args.rounds, warmup=1,
                                     device=torch.device("cpu"))
    recompiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
    rows = []
    for kind in ("seq step", "jacobi pass", "sample seq", "sample jacobi"):
        e, c = medians[f"{kind}/eager"], medians[f"{kind}/compiled"]
        unit = cfg.num_patches - 1 if kind == "seq step" else 1
        rows.append(f"| {kind} | {batch} | {e / unit * 1e3:.3f} | {c / unit * 1e3:.3f} | "
                    f"{e / c:.2f}x | {compile_s[kind]:.1f} |")
    if recompiled:
        rows.append(f"| (graphs compiled during the timed rounds: {recompiled}) | | | | | |")
    return rows


def train_rows(net: TarFlow, batch: int, args) -> list[str]:
    cfg = net.config
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, cfg.in_channels, cfg.img_size, cfg.img_size, generator=gen) * 2 - 1
    y = torch.randint(0, cfg.num_classes, (batch,), generator=gen) if cfg.conditional else None
    models = {"eager": copy.deepcopy(net).train(), "compiled": copy.deepcopy(net).train()}
    for block in models["compiled"].blocks:
        block.compile(backend=args.backend, mode=args.mode)
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}

    def step(name: str):
        opts[name].zero_grad(set_to_none=True)
        models[name].nll(x, y).mean().backward()
        opts[name].step()

    step("eager")
    eager = _timed(lambda: step("eager"))
    compile_s = _timed(lambda: step("compiled")) - eager
    medians, _ = interleaved_medians({k: lambda k=k: step(k) for k in models},
                                     repeats=args.train_rounds, warmup=1,
                                     device=torch.device("cpu"))
    e, c = medians["eager"], medians["compiled"]
    return [f"| training step | {batch} | {e * 1e3:.1f} ({batch / e:.0f} img/s) | "
            f"{c * 1e3:.1f} ({batch / c:.0f} img/s) | {e / c:.2f}x | {compile_s:.1f} |"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--train-batch", type=int, default=64, help="0 skips the training step")
    p.add_argument("--tol", type=float, default=3e-3, help="Jacobi tolerance (sample jacobi)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--train-rounds", type=int, default=10)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--mode", default=None, help="torch.compile mode (default, max-autotune, ...)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    net = TarFlow.from_checkpoint(args.checkpoint).eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU; "
          f"{net.config.tag}, N={net.config.num_patches}; backend {args.backend}, "
          f"mode {args.mode or 'default'}")
    print("| what | batch | eager ms | compiled ms | speed-up | compile s |\n"
          "|---|---|---|---|---|---|")
    for batch in args.batch:
        for row in sampling_rows(net, batch, args):
            print(row, flush=True)
    if args.train_batch:
        for row in train_rows(net, args.train_batch, args):
            print(row, flush=True)
    print("(ms: per sequential step, per Jacobi pass, per sampler call, per training step; "
          "medians of round-robin rounds)")


if __name__ == "__main__":
    main()
