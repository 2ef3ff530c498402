"""Before/after timing of a code change: the same samplers, weights, noise and batch, run by two
(or more) revisions of tarflow in alternating rounds of one benchmark run.

Each revision is exported with ``git archive`` into a temporary directory (``WORKTREE`` means the
current working tree, uncommitted edits included) and timed by scripts/ab_worker.py in a
subprocess whose PYTHONPATH points at that copy. Rounds alternate A, B, A, B, ... so that a
machine-load drift hits every revision alike; the reported time is the median over all repeats of
all rounds. The images of every revision are compared with the first revision's, so a speed change
that is not also a results-preserving change shows up as max|diff| > 0.

    python scripts/ab_bench.py CKPT --revs HEAD~1 WORKTREE --batch 1 4 --methods sequential jacobi
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "ab_worker.py"


def export(rev: str, into: Path) -> Path:
    """A copy of the ``tarflow`` package at ``rev`` (or the working tree), returned as a dir."""
    if rev == "WORKTREE":
        return ROOT
    out = into / rev.replace("/", "_")
    out.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "tarflow"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def run_worker(path: Path, spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(path)}
    proc = subprocess.run([sys.executable, str(WORKER), json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed for {path}:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = str(path / "tarflow")
    if not out["package"].startswith(expected):
        raise SystemExit(f"worker imported {out['package']}, expected a package under {expected}")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--revs", nargs="+", required=True,
                   help="git revisions to compare, the first is the baseline; WORKTREE = the "
                   "current files")
    p.add_argument("--methods", nargs="+", default=["sequential", "jacobi"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--tol", type=float, default=3e-3)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    spec = {k: getattr(args, k) for k in ("methods", "batch", "tol", "guidance", "repeats",
                                          "warmup", "threads", "seed")}
    spec["checkpoint"] = str(Path(args.checkpoint).resolve())
    times: dict[tuple, list[float]] = {}
    ratios: dict[tuple, list[float]] = {}  # per worker: its sequential median / method median
    last: dict[tuple, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {rev: export(rev, Path(tmp)) for rev in args.revs}
        for r in range(args.rounds):
            for rev in args.revs:
                print(f"round {r + 1}/{args.rounds}: {rev}", file=sys.stderr, flush=True)
                results = run_worker(paths[rev], spec)["results"]
                seq = {res["batch"]: res["median"] for res in results
                       if res["method"] == "sequential"}
                for res in results:
                    key = (rev, res["method"], res["batch"])
                    times.setdefault(key, []).extend(res["times"])
                    if res["batch"] in seq:
                        ratios.setdefault(key, []).append(seq[res["batch"]] / res["median"])
                    last[key] = res
    base = args.revs[0]
    head = ["method", "batch"] + [f"`{rev}` ms" for rev in args.revs]
    head += [f"`{rev}` vs `{base}`" for rev in args.revs[1:]]
    if "sequential" in args.methods:
        head += [f"`{rev}` speed-up" for rev in args.revs]
    head += ["max|Δimage|", "iters"]
    print(f"threads {args.threads}, guidance {args.guidance}, tol {args.tol}, "
          f"{args.rounds} rounds x {args.repeats} repeats, medians. 'speed-up' = sequential / "
          f"method within each worker process (median over rounds): it cancels the "
          f"process-to-process speed differences of a VM that the raw times keep.\n")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for method in args.methods:
        for batch in args.batch:
            med = {rev: statistics.median(times[(rev, method, batch)]) for rev in args.revs}
            ref = last[(base, method, batch)]["images"]
            diff = max(max(abs(a - b) for a, b in zip(last[(rev, method, batch)]["images"], ref,
                                                      strict=True)) for rev in args.revs)
            iters = " / ".join(" ".join(str(n) for _, n in sorted(
                last[(rev, method, batch)]["iters"].items(), key=lambda kv: -int(kv[0])))
                for rev in args.revs)
            cells = [method, str(batch)] + [f"{med[rev] * 1e3:.1f}" for rev in args.revs]
            cells += [f"{med[base] / med[rev]:.2f}x" for rev in args.revs[1:]]
            if "sequential" in args.methods:
                cells += [f"{statistics.median(ratios[(rev, method, batch)]):.2f}x"
                          for rev in args.revs]
            cells += [f"{diff:.1e}", iters]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
