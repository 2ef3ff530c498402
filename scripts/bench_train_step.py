"""Time one training step (forward, backward, AdamW) of several model presets in one process,
round-robin, so that equal-budget comparisons of architectures (e.g. the TarFlow demo against
its deep-shallow twin) are made at equal cost per step.

    python scripts/bench_train_step.py demo demo_deep_shallow --batch 32 --rounds 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tarflow.model import TarFlow, preset


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("presets", nargs="+")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = {}
    for name in args.presets:
        torch.manual_seed(0)
        model = TarFlow(preset(name)).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        cfg = model.config
        x = torch.rand(args.batch, cfg.in_channels, cfg.img_size, cfg.img_size) * 2 - 1
        y = torch.randint(cfg.num_classes, (args.batch,)) if cfg.conditional else None

        def step(model=model, opt=opt, x=x, y=y):
            opt.zero_grad(set_to_none=True)
            model.nll(x, y).mean().backward()
            opt.step()

        steps[name] = (step, sum(p.numel() for p in model.parameters()))
    for step, _ in steps.values():  # warm-up
        step()
        step()
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, (step, _) in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    print(f"| preset | tag | params (M) | batch | ms/step (median of {args.rounds}) |")
    print("|---|---|---|---|---|")
    for name, (_, params) in steps.items():
        print(f"| {name} | {preset(name).tag} | {params / 1e6:.2f} | {args.batch} | "
              f"{statistics.median(times[name]) * 1e3:.1f} |")


if __name__ == "__main__":
    main()
