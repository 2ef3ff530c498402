"""Memory and start-up of the ImageNet64 npz reader against a prepared (memory-mapped) set.

Writes a synthetic ImageNet64-format set with the project's own npz writer (ten
``train_data_batch_*.npz`` + ``val_data.npz``; kept and reused under ``--data-dir``), prepares it
with ``tarflow-prepare``'s function, then for each reader launches a 2-process CPU DDP run (gloo)
with 2 DataLoader workers per rank through the project's :class:`TarFlowDataModule` (the model is
a tiny classifier: the data path is what is measured). After ``--measure-at`` training steps
rank 0 reads ``/proc/<pid>/smaps_rollup`` of both ranks and their workers. ``fake`` (images
computed per item, nothing loaded) is the baseline that the data's memory is measured against.

    /tmp/tl/heavy python scripts/bench_data_memory.py --stage setup
    /tmp/tl/timing python scripts/bench_data_memory.py --stage measure --rounds 2

Prints markdown tables and writes ``<data-dir>/report.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

READERS = ("npz", "prepared", "fake")
MIB = 1 << 20


def smaps(pid: int) -> dict[str, int]:
    """``/proc/<pid>/smaps_rollup`` in bytes; USS = private clean + private dirty pages."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0]) * 1024
    out["USS"] = out["Private_Clean"] + out["Private_Dirty"]
    return out


# ---------------------------------------------------------------- parent: data, runs, tables


def ensure_npz(root: Path, images: int, files: int, seed: int = 0) -> int:
    """Write (or reuse) the synthetic npz files; returns the train image count."""
    from tarflow.data import write_imagenet_npz

    per_file = images // files
    expected = [root / f"train_data_batch_{k}.npz" for k in range(1, files + 1)]
    row = 3 * 64 * 64
    done = root / "complete.json"
    if done.is_file() and json.loads(done.read_text()) == {"images": images, "files": files}:
        return per_file * files
    rng = np.random.default_rng(seed)
    for path in [*expected, root / "val_data.npz"]:
        n = per_file if path in expected else 1000
        data = rng.integers(0, 256, (n, 3, 64, 64), dtype=np.uint8)
        write_imagenet_npz(path, data, rng.integers(0, 1000, n), channels_last=False)
        print(f"wrote {path} ({n * row / MIB:.0f} MiB)", flush=True)
    done.write_text(json.dumps({"images": images, "files": files}))
    return per_file * files


def warm(paths: list[Path]) -> None:
    """Read files once so every reader starts from the page cache (a fair, repeatable start)."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(64 * MIB):
                pass


def launch(args, reader: str, run_dir: Path) -> dict:
    """One 2-rank DDP run; returns rank 0's report."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for f in run_dir.iterdir():
        f.unlink()
    env = {**os.environ, "BENCH_T0": repr(time.time()), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", reader,
           "--data-dir", str(args.data_dir), "--run-dir", str(run_dir),
           "--steps", str(args.steps), "--measure-at", str(args.measure_at),
           "--batch-size", str(args.batch_size)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"{reader} run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads((run_dir / "report.json").read_text())


def summarise(runs: list[dict], dataset_bytes: int) -> str:
    by = {r: [x for x in runs if x["reader"] == r] for r in READERS}
    base = {role: statistics.mean(p["Pss_Anon"] for p in by["fake"][0]["processes"]
                                  if p["role"] == role) for role in ("rank", "worker")}
    lines = [
        "| reader | process | USS MiB | PSS MiB | anon PSS MiB | data's private MiB | % of set |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    totals = {}
    for reader in READERS:
        procs = by[reader][-1]["processes"]
        for p in procs:
            # The data's share of anonymous (unshareable, unreclaimable) memory: this process's
            # proportional share of anonymous pages beyond the fake-data baseline's.
            p["data"] = max(0, p["Pss_Anon"] - base[p["role"]]) if reader != "fake" else 0
            lines.append(
                f"| {reader} | {p['name']} | {p['USS'] / MIB:.0f} | {p['Pss'] / MIB:.0f} | "
                f"{p['Pss_Anon'] / MIB:.0f} | {p['data'] / MIB:.0f} | "
                f"{100 * p['data'] / dataset_bytes:.1f} |"
            )
        ranks = {p["name"].split(" worker")[0] for p in procs}
        per_rank = max(sum(p["data"] for p in procs if p["name"].startswith(r)) for r in ranks)
        totals[reader] = (max(p["data"] for p in procs), per_rank, sum(p["Pss"] for p in procs))
    lines += ["", "| reader | largest per-process data MiB (% of set) | per rank incl. its workers "
              "MiB (% of set) | PSS of all 6 processes MiB |", "|---|---:|---:|---:|"]
    for reader in READERS[:2]:
        one, rank, pss = totals[reader]
        lines.append(f"| {reader} | {one / MIB:.0f} ({100 * one / dataset_bytes:.1f}%) | "
                     f"{rank / MIB:.0f} ({100 * rank / dataset_bytes:.1f}%) | {pss / MIB:.0f} |")
    lines += ["", "| reader | launch -> first step s | dataset set-up s (slowest rank) | "
              "set-up + first batch s | rounds |", "|---|---:|---:|---:|---:|"]
    med = {}
    for reader in READERS:
        rs = by[reader]
        first = statistics.median(r["first_step_s"] for r in rs)
        setup = statistics.median(max(r["setup_s"]) for r in rs)
        data = statistics.median(r["data_startup_s"] for r in rs)
        med[reader] = (first, data)
        times = ", ".join(f"{r['first_step_s']:.1f}" for r in rs)
        lines.append(f"| {reader} | {first:.1f} ({times}) | {setup:.2f} | {data:.2f} | {len(rs)} |")
    (nf, nd), (pf, pd) = med["npz"], med["prepared"]
    lines += ["", f"npz / prepared: launch -> first step {nf / pf:.2f}x, data start-up "
              f"(set-up + first batch) {nd / pd:.1f}x"]
    return "\n".join(lines)


def parent(args) -> int:
    from tarflow.data import prepare_dataset

    npz_dir, prepared = args.data_dir / "npz", args.data_dir / "prepared"
    if args.stage in ("setup", "all"):
        t = time.perf_counter()
        n = ensure_npz(npz_dir, args.images, args.files)
        print(f"npz set: {n} train images, {time.perf_counter() - t:.1f} s", flush=True)
        t = time.perf_counter()
        _, copied = prepare_dataset("imagenet64", npz_dir, prepared)
        print(f"prepare: {'done' if copied else 'reused'} in {time.perf_counter() - t:.1f} s")
    if args.stage == "setup":
        return 0
    if not (prepared / "manifest.json").is_file():
        raise SystemExit(f"no prepared set in {prepared}; run --stage setup first")
    manifest = json.loads((prepared / "manifest.json").read_text())
    dataset_bytes = manifest["splits"]["train"]["count"] * 3 * 64 * 64
    npz_bytes = sum(p.stat().st_size for p in npz_dir.glob("*.npz"))
    warm([*npz_dir.glob("*.npz"), *prepared.rglob("*.npy")])
    runs = []
    for k in range(args.rounds):  # round-robin, so drift in machine load hits every reader
        for reader in READERS if k == 0 else READERS[:2]:
            report = launch(args, reader, args.data_dir / "runs" / reader)
            print(f"round {k} {reader}: first step at {report['first_step_s']:.1f} s", flush=True)
            runs.append(report)
    raw = args.data_dir / "report.json"
    raw.write_text(json.dumps({"runs": runs}, indent=1))  # kept even if the tables fail
    table = summarise(runs, dataset_bytes)
    head = (f"train set {manifest['splits']['train']['count']} images 64x64x3 = "
            f"{dataset_bytes / 1e9:.2f} GB ({npz_bytes / 1e9:.2f} GB of npz files); 2 ranks "
            f"(gloo) x 2 workers, batch {args.batch_size}/rank, measured after step "
            f"{args.measure_at}")
    print(head + "\n\n" + table)
    raw.write_text(json.dumps({"head": head, "runs": runs}, indent=1))
    return 0


# ---------------------------------------------------------------- child: one DDP rank


def child(args) -> int:
    import lightning as L
    import torch

    from tarflow.lit.datamodule import TarFlowDataModule

    t0 = float(os.environ["BENCH_T0"])
    run_dir = Path(args.run_dir)

    class Pids(torch.utils.data.Dataset):
        """Passes items through; each process records its pid at its first item."""

        def __init__(self, ds) -> None:
            self.ds, self.seen = ds, None

        def __len__(self) -> int:
            return len(self.ds)

        def __getitem__(self, i):
            if self.seen != os.getpid():
                self.seen = os.getpid()
                (run_dir / f"worker_{os.getppid()}_{self.seen}").touch()
            return self.ds[i]

    class Data(TarFlowDataModule):
        setup_s = 0.0

        def setup(self, stage=None) -> None:
            t = time.perf_counter()
            super().setup(stage)
            self.setup_s += time.perf_counter() - t
            if not isinstance(self.train_set, Pids):
                self.train_set = Pids(self.train_set)

    class Tiny(L.LightningModule):
        """Logits from the per-channel means: a real backward and DDP all-reduce, no compute."""

        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(3, 1000)

        def training_step(self, batch, _):
            x, y = batch  # (B, 3, 64, 64), (B,)
            return torch.nn.functional.cross_entropy(self.head(x.mean((2, 3))), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class Probe(L.Callback):
        def on_train_start(self, trainer, module) -> None:
            self.train_start = time.time()
            (run_dir / f"rank_{trainer.global_rank}_{os.getpid()}").touch()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            if batch_idx == 0:
                self.first = time.time()
            if batch_idx != args.measure_at:
                return
            setups = trainer.strategy.all_gather(torch.tensor(trainer.datamodule.setup_s))
            trainer.strategy.barrier()  # every rank is past its first steps
            if trainer.global_rank == 0:
                procs = []
                for f in sorted(run_dir.glob("rank_*")):
                    _, rank, pid = f.name.split("_")
                    procs.append({"name": f"rank {rank}", "role": "rank", "pid": int(pid)})
                    workers = sorted(run_dir.glob(f"worker_{pid}_*"))
                    for k, w in enumerate(workers):
                        procs.append({"name": f"rank {rank} worker {k}", "role": "worker",
                                      "pid": int(w.name.split("_")[2])})
                for p in procs:
                    p.update(smaps(p["pid"]))
                report = {"reader": args.child, "first_step_s": self.first - t0,
                          "setup_s": [float(s) for s in setups.flatten()],
                          "data_startup_s": float(setups.max()) + self.first - self.train_start,
                          "processes": procs}
                (run_dir / "report.json").write_text(json.dumps(report))
            trainer.strategy.barrier()

    name = "fake" if args.child == "fake" else "imagenet64"
    root = {"npz": "npz", "prepared": "prepared"}.get(args.child)
    data = Data(
        name, img_size=64, channels=3, num_classes=1000, batch_size=args.batch_size,
        root=None if root is None else str(Path(args.data_dir) / root), num_workers=2,
        pin_memory=False, persistent_workers=True, flip=True, seed=0,
        dataset_kwargs={"num_classes": 1000} if root is None else {},
        train_kwargs={"length": 100_000} if root is None else {},
        val_kwargs={"length": 1000} if root is None else {},
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=args.steps,
        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Probe()],
        default_root_dir=str(run_dir),
    )
    trainer.fit(Tiny(), datamodule=data)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=Path("/tmp/tarflow_bench_data"))
    p.add_argument("--stage", choices=["setup", "measure", "all"], default="all")
    p.add_argument("--images", type=int, default=100_000, help="train images (>= 100k: 1.23 GB)")
    p.add_argument("--files", type=int, default=10, help="train npz files")
    p.add_argument("--rounds", type=int, default=2, help="runs per reader (fake runs once)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--measure-at", type=int, default=5, help="step index of the measurement")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--child", choices=READERS, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    return child(args) if args.child else parent(args)


if __name__ == "__main__":
    raise SystemExit(main())
