"""Worker of scripts/ab_bench.py: time samplers with whichever ``tarflow`` is on PYTHONPATH.

Deliberately uses only the long-stable API (TarFlow.from_checkpoint, sample, build_schedule), so
that old revisions can be timed by the same code. Prints one JSON object on the last line.

    PYTHONPATH=<checkout> python scripts/ab_worker.py '<json spec>'
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time

import torch


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    import tarflow
    from tarflow.model import TarFlow
    from tarflow.sampling import SamplingSchedule, build_schedule, sample

    model = TarFlow.from_checkpoint(spec["checkpoint"]).eval()
    cfg = model.config
    results = []
    for batch in spec["batch"]:
        gen = torch.Generator().manual_seed(spec["seed"])
        noise = torch.randn(batch, cfg.num_patches, cfg.token_dim, generator=gen)
        noise = noise * cfg.noise_std
        y = (torch.randint(0, cfg.num_classes, (batch,), generator=gen)
             if cfg.conditional else None)
        for method in spec["methods"]:
            schedule = (SamplingSchedule.sequential() if method == "sequential"
                        else build_schedule(method, tol=spec["tol"]))

            def run(s=schedule, noise=noise, y=y):
                return sample(model, noise, y, s, guidance=spec["guidance"])

            for _ in range(spec["warmup"]):
                images, stats = run()
            gc.collect()
            gc.disable()  # back-to-back calls, as tarflow.eval.bench.median_time times them
            times = []
            for _ in range(spec["repeats"]):
                t0 = time.perf_counter()
                images, stats = run()
                times.append(time.perf_counter() - t0)
            gc.enable()
            results.append({"batch": batch, "method": method, "times": times,
                            "median": statistics.median(times),
                            "iters": {str(b): n for b, n in stats.iters.items()},
                            "images": images.double().flatten().tolist()})
    print(json.dumps({"package": tarflow.__file__, "results": results}))


if __name__ == "__main__":
    main()
