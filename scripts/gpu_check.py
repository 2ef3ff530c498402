"""The GPU check: everything this project has only ever run on CPUs, measured in one call.

    python scripts/gpu_check.py --out gpu_check --demo-ckpt demo.ckpt   # on a GPU, ~5 minutes
    python scripts/gpu_check.py --out /tmp/smoke --cpu-smoke            # same code, toy sizes (CI)

Sections (each times itself, records ``ok`` / ``failed: <error>`` / ``skipped: <why>``, and a
failure does not stop the others):
  train     bf16-mixed training steps of the img64_cond architecture on fake data: steps/s,
            images/s, peak memory, with ``module.compile``'s per-block compile off and on.
  lightning a DDP (NCCL on a GPU) and an FSDP ``tarflow-train`` run on one device: 2 steps that
            save last.ckpt, a resume for 2 more, and ``TarFlow.from_checkpoint`` on the result.
  planner   ``tarflow-bench`` on the demo checkpoint at batch 64 and 256: the plan the planner
            prints, its speed-up over the sequential loop, beside fixed Jacobi (fp32, bf16).
  passes    a paper-size block (img64_cond, random weights) at batch 64 / 256, fp32 and bf16:
            one Jacobi pass (N-1 tokens), one GS segment, one sequential step, and how many
            sequential steps a pass costs; the paper's published schedule for it, for reference.
  tests     the ``gpu``-marked tests (tests/gpu).
Writes ``gpu_check.json`` and ``gpu_check.md`` (a table per section) into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from tarflow.model import Guidance, TarFlow, preset
from tarflow.sampling.precision import network_copy
from tarflow.sampling.timing import pass_seconds

REPO = Path(__file__).resolve().parents[1]
# The GS-Jacobi paper's best schedule for ImageNet64 cond and its speed-up on its GPU.
PAPER_SCHEDULE = ("img64_cond", "[0/7-256/8-1/13-6]", 2.51)
# Tiny Lightning runs: 2 steps an epoch on fake data, validation sampling without FID.
RUN = ["data=fake", "data.train_kwargs.length=16", "data.val_kwargs.length=8",
       "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "logger=csv",
       "final_samples.enabled=false", "callbacks.sampling.fid_stats_path=null",
       "callbacks.sampling.num_samples=8", "callbacks.sampling.batch_size=8",
       "callbacks.sampling.compare_sequential=0", "~callbacks.progress_bar",
       "trainer.enable_progress_bar=false"]


def profile(cpu_smoke: bool) -> dict:
    """Sizes of every section: the real ones on a GPU, toy ones for the CPU smoke run."""
    if cpu_smoke:
        return dict(device="cpu", train_preset="tiny", train_batch=4, steps=2, warmup=1,
                    compile={"backend": "eager"}, model=["model=tiny", "data.img_size=8",
                                                         "data.channels=1", "data.num_classes=0",
                                                         "sampler.guidance=0.0",
                                                         "sampler.denoise=0.0"],
                    trainer=["trainer.accelerator=cpu", "trainer.precision=32-true",
                             "data.batch_size=4", "data.num_workers=0"],
                    bench_batches=[2], pass_preset="tiny", pass_batches=[2])
    return dict(device="cuda", train_preset="img64_cond", train_batch=64, steps=10, warmup=3,
                compile={}, model=["experiment=demo"],
                trainer=["trainer.accelerator=gpu", "trainer.precision=bf16-mixed",
                         "data.batch_size=32"],
                bench_batches=[64, 256], pass_preset="img64_cond", pass_batches=[64, 256])


def train_steps(p: dict, compiled: bool) -> dict:
    """Median-free throughput: ``steps`` timed steps after ``warmup``, bf16 autocast."""
    device = torch.device(p["device"])
    torch.manual_seed(0)
    cfg = preset(p["train_preset"])
    model = TarFlow(cfg).to(device).train()
    if compiled:
        for block in model.blocks:  # what module.compile does: per block, keys unchanged
            block.compile(**p["compile"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    B = p["train_batch"]
    x = torch.rand(B, cfg.in_channels, cfg.img_size, cfg.img_size, device=device) * 2 - 1
    y = torch.randint(cfg.num_classes, (B,), device=device) if cfg.conditional else None

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model.nll(x + cfg.noise_std * torch.randn_like(x), y).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(p["warmup"]):
        step()
    _sync(device)
    first = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(p["steps"]):
        step()
    _sync(device)
    sec = (time.perf_counter() - t0) / p["steps"]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    params = sum(t.numel() for t in model.parameters()) / 1e6
    return {"preset": p["train_preset"], "params_M": round(params, 1), "batch": B,
            "compile": compiled, "warmup_s": round(first, 2), "steps_per_s": round(1 / sec, 3),
            "images_per_s": round(B / sec, 1),
            "peak_GiB": None if peak is None else round(peak, 2)}


def lightning_run(p: dict, out: Path, trainer: str) -> dict:
    """Train 2 steps (saving last.ckpt), resume to 4, and load the result without Lightning."""
    run_dir = out / f"run_{trainer}"
    extra = ["~callbacks.ema"] if trainer == "fsdp" else []
    base = [*p["model"], *RUN, f"trainer={trainer}", "trainer.devices=1", *p["trainer"], *extra,
            f"hydra.run.dir={run_dir}"]
    first = _train_cli([*base, "trainer.max_epochs=1"], out)
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.exists():
        raise RuntimeError(f"no {last} after the first run")
    second = _train_cli([*base, "trainer.max_epochs=2", f"ckpt_path={last}"], out)
    net = TarFlow.from_checkpoint(last).eval()
    cfg = net.config
    x = torch.rand(2, cfg.in_channels, cfg.img_size, cfg.img_size) * 2 - 1
    y = torch.zeros(2, dtype=torch.long) if cfg.conditional else None
    with torch.no_grad():
        nll = net.nll(x, y).mean().item()
    if nll != nll:
        raise RuntimeError("the loaded checkpoint gives a NaN likelihood")
    return {"trainer": trainer, "train_s": first, "resume_s": second,
            "checkpoint": "dir" if last.is_dir() else "file", "loaded_nll": round(nll, 4)}


def _train_cli(args: list[str], out: Path) -> float:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "tarflow.cli.train", *args]
    done = subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "WANDB_MODE": "offline"})
    if done.returncode:
        raise RuntimeError(f"tarflow-train exited {done.returncode}: "
                           + (done.stderr.strip().splitlines() or ["(no stderr)"])[-1])
    return round(time.perf_counter() - t0, 1)


def planner(p: dict, out: Path, ckpt: Path | None) -> dict:
    """tarflow-bench on the demo checkpoint: plans and speed-ups at the large batches."""
    if ckpt is None:
        ckpt = out / "run_ddp" / "checkpoints" / "last.ckpt"  # untrained: the lightning check's
        if not ckpt.exists():
            raise RuntimeError("no --demo-ckpt and no checkpoint from the lightning section")
    table = out / "bench.json"
    cmd = [sys.executable, "-m", "tarflow.cli.bench", str(ckpt), "--device", p["device"],
           "--data", "fake", "--tol", "3e-3", "--repeats", "3", "--plan-cache",
           str(out / "plans.json"), "--json", str(table), "--batch",
           *map(str, p["bench_batches"]), "--methods", "sequential", "auto", "jacobi",
           "jacobi@bf16"]
    done = subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=900)
    (out / "bench.log").write_text(done.stdout + done.stderr)
    if done.returncode:
        raise RuntimeError(f"tarflow-bench exited {done.returncode}: "
                           + (done.stderr.strip().splitlines() or ["(no stderr)"])[-1])
    plans = [line.strip() for line in done.stdout.splitlines() if "plan" in line.lower()]
    rows = [{"batch": r["batch"], "method": r["method"], "schedule": r["schedule"],
             "ms_per_image": round(r["seconds_per_image"] * 1e3, 3),
             "speedup": round(r["speedup"], 2), "rel_err": f"{r['rel_err']:.1e}",
             "iters": "/".join(str(v) for v in r["iters"].values())}
            for r in json.loads(table.read_text())["rows"]]
    return {"checkpoint": str(ckpt), "plan_lines": plans, "rows": rows}


@torch.no_grad()
def passes(p: dict) -> dict:
    """Per-pass timings of a paper-size architecture (random weights; weights do not change
    the cost of a pass, only how many passes a block needs)."""
    device = torch.device(p["device"])
    torch.manual_seed(0)
    model = TarFlow(preset(p["pass_preset"])).to(device).eval()
    nets = {"bfloat16": network_copy(model, torch.bfloat16)}
    rows = []
    for B in p["pass_batches"]:
        noise = model.sample_noise(B)
        y = torch.zeros(B, dtype=torch.long, device=device) if model.config.conditional else None
        pass_seconds(model, nets, noise, y, Guidance())  # warm-up: kernels, allocator, autotuning
        t = pass_seconds(model, nets, noise, y, Guidance())
        for d in (None, "bfloat16"):
            rows.append({"preset": p["pass_preset"], "batch": B, "net": d or "float32",
                         "pass_ms": round(t[(d, "long")] * 1e3, 3),
                         "segment_ms": round(t[(d, "short")] * 1e3, 3),
                         "step_ms": round(t[(d, "one")] * 1e3, 3),
                         "steps_per_pass": round(t[(d, "long")] / t[(d, "one")], 2)})
    name, spec, speedup = PAPER_SCHEDULE
    return {"rows": rows, "paper_schedule": f"{name}: {spec}, {speedup}x on the paper's GPU"}


def gpu_tests() -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    summary = (done.stdout.strip().splitlines() or [""])[-1]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", summary)}
    if done.returncode not in (0, 5) or counts.get("failed") or counts.get("error"):
        raise RuntimeError(f"gpu tests: {summary}")
    return {"summary": summary, **counts}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def section(results: dict, name: str, fn) -> None:
    t0 = time.perf_counter()
    try:
        results[name] = {"status": "ok", "result": fn()}
    except Exception as err:  # one failing section must not hide the others' results
        results[name] = {"status": f"failed: {type(err).__name__}: {err}",
                         "traceback": traceback.format_exc(limit=8)}
    results[name]["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"[gpu_check] {name}: {results[name]['status']} ({results[name]['seconds']} s)",
          flush=True)


def markdown(results: dict) -> str:
    lines = [f"# GPU check: {results['env']['device']}", "",
             f"torch {results['env']['torch']}, CUDA {results['env']['cuda']}, "
             f"{results['env']['when']}", ""]
    for name, sec in results.items():
        if name == "env":
            continue
        lines += [f"## {name}: {sec['status']} ({sec['seconds']} s)", ""]
        res = sec.get("result")
        rows = res if isinstance(res, list) else (res or {}).get("rows")
        if isinstance(res, dict) and name == "planner":
            lines += [f"checkpoint: `{res['checkpoint']}`", ""]
            lines += [f"    {line}" for line in res["plan_lines"]] + [""]
        if rows and isinstance(rows, list) and isinstance(rows[0], dict):
            keys = list(rows[0])
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(str(r.get(k)) for k in keys) + " |" for r in rows]
        elif isinstance(res, dict):
            lines += [f"- {k}: {v}" for k, v in res.items() if k != "rows"]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--out", required=True, type=Path, help="folder for the JSON, table and runs")
    ap.add_argument("--demo-ckpt", type=Path, help="the README demo's last.ckpt (planner section;"
                    " without it the planner runs on the lightning section's untrained model)")
    ap.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU (CI)")
    ap.add_argument("--only", nargs="+", choices=["train", "lightning", "planner", "passes",
                                                  "tests"])
    args = ap.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("error: no CUDA device; run with --cpu-smoke for the toy-size check on a CPU",
              file=sys.stderr)
        return 2
    if args.demo_ckpt is not None and not args.demo_ckpt.exists():
        print(f"error: --demo-ckpt {args.demo_ckpt} does not exist", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    ckpt = None if args.demo_ckpt is None else args.demo_ckpt.resolve()
    p = profile(args.cpu_smoke)
    wanted = set(args.only or ["train", "lightning", "planner", "passes", "tests"])
    dev = torch.cuda.get_device_name() if p["device"] == "cuda" else platform.processor() or "cpu"
    results: dict = {"env": {"device": dev, "torch": torch.__version__,
                             "cuda": torch.version.cuda, "cpu_smoke": args.cpu_smoke,
                             "when": time.strftime("%Y-%m-%d %H:%M")}}
    jobs = {"train": lambda: [train_steps(p, c) for c in (False, True)],
            "lightning": lambda: [lightning_run(p, out, t) for t in ("ddp", "fsdp")],
            "planner": lambda: planner(p, out, ckpt), "passes": lambda: passes(p),
            "tests": gpu_tests}
    for name, fn in jobs.items():
        if name in wanted:
            section(results, name, fn)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    (out / "gpu_check.md").write_text(markdown(results))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0 if all(s["status"] == "ok" for k, s in results.items() if k != "env") else 1


if __name__ == "__main__":
    sys.exit(main())
