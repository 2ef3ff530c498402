"""Issue 29: a distilled student against its teacher, and as the exact sampler's guess.

One process, one set of noises and labels (fixed-set members 0 .. N-1 at --seed), every row:
  teacher sequential · teacher auto (the planner at --tol) · student K = 1, 2, 4, 8 ·
  teacher Jacobi from the student's guess in every block ("{else:S1/student}") · the planner
  offered the student's guess as a candidate per block ("auto + student": it keeps the guess
  only where it pays for its cost).
Per row: seconds per image at each --batch (round-robin medians, tarflow.eval.bench), passes per
block, distance from the sequential loop (relative error), FID@N (--fid N; not timed).
A second part walks checkpoints of one training run (--along): each student's relative error to
the teacher on held-out pairs against the passes per block its guess leaves to Jacobi.

    flock /tmp/tarflow-timing.lock python scripts/student_pareto.py --teacher T.ckpt \
        --student S.ckpt --fid-stats data/fid_stats/demo_16px_c1_train128.npz --fid 64 \
        --along run/checkpoints/epoch*.ckpt --pairs run/pairs --out docs/assets/student
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tarflow.data import build_dataset
from tarflow.data.pairs import PairSet
from tarflow.eval import InceptionFeatures, load_reference
from tarflow.eval.bench import Method, benchmark
from tarflow.eval.fid_at_n import feature_extractor, fid_at_n
from tarflow.eval.fid_reference import reference_stats
from tarflow.lit.distill import relative_error
from tarflow.model.loading import load_for_sampling
from tarflow.sampling import parse_schedule, sample
from tarflow.sampling.plan import PlanCache
from tarflow.sampling.sample_set import fixed_inputs
from tarflow.sampling.schedule import SamplingSchedule
from tarflow.sampling.settings import parse_sampler


def chart(points: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, title: str,
          path: Path, logx: bool = True) -> None:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for label, pts in points.items():
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, "o-" if len(pts) > 1 else "o", label=label)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(path))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", help="the student of the rows (not needed with --only-along)")
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--tol", type=float, default=3e-3)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fid", type=int, default=0)
    p.add_argument("--fid-stats")
    p.add_argument("--fid-ref", type=int, default=128, help="reference images when --fid-stats "
                   "must be computed (the demo's training split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--along", nargs="*", default=[])
    p.add_argument("--pairs")
    p.add_argument("--pairs-count", type=int, default=0, help="members in --pairs (train + "
                   "val); the last --held are the held-out ones measured")
    p.add_argument("--held", type=int, default=16, help="held-out pairs of the --along walk")
    p.add_argument("--only-along", action="store_true", help="only the --along walk (students "
                   "of one or more runs, written to along.json / passes_vs_error.png)")
    p.add_argument("--out", required=True)
    p.add_argument("--no-auto", action="store_true", help="time Jacobi at --tol from z instead "
                   "of the planner's schedule")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_for_sampling(args.teacher, device="cpu").net
    if args.only_along:
        along(args, teacher, out, {"guidance": args.guidance}, {"teacher": args.teacher},
              name="along.json")
        return
    if not args.student:
        p.error("--student is needed (or --only-along)")
    student = load_for_sampling(args.student, device="cpu").net
    knobs = {"guidance": args.guidance}
    settings = parse_sampler({"schedule": "auto", "tol": args.tol, "net_dtype": "float32",
                              "guidance": args.guidance, "planner": {"rounds": 1}})
    cache = PlanCache(str(out / "plans.json"))
    result = {"uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout,
              "teacher": args.teacher, "student": args.student, "tol": args.tol,
              "guidance": args.guidance, "rows": []}
    jacobi_s = parse_schedule(f"{{else:S1/student}} tol={args.tol}")
    fid_methods = {}
    for B in args.batch:
        if args.no_auto:  # the planner is slow to time under heavy load: Jacobi instead
            plan_schedule = SamplingSchedule.jacobi(None, tol=args.tol)
        else:
            plan_schedule, _ = settings.schedule_for(teacher, None, B, cache=cache, seed=1)
        methods = {
            ("teacher jacobi" if args.no_auto else "teacher auto"): Method(plan_schedule),
            **{f"student K={k}": Method(SamplingSchedule.sequential(), student=student,
                                        steps=k) for k in (1, 2, 4, 8)},
            "jacobi from student": Method(jacobi_s, student=student),
        }
        if not args.no_auto:
            offered, plan = settings.schedule_for(teacher, None, B, cache=cache, seed=1,
                                                  student=student)
            print(f"B={B} plan with the student offered:\n{plan.table()}", flush=True)
            methods["auto + student"] = Method(offered, student=student)
            result[f"plan_student_{B}"] = plan.summary()
        if B == args.batch[0]:
            fid_methods = methods
        noise, y = fixed_inputs(teacher, range(B), args.seed)
        rows = benchmark(teacher, noise, y, methods, repeats=args.repeats, warmup=1,
                         progress=print, **knobs)
        for r in rows:
            print(f"B={B} {r.method:22s} {r.seconds_per_image * 1e3:8.2f} ms/img "
                  f"{r.speedup:6.2f}x rel {r.rel_err:.2e} iters {r.iters}", flush=True)
            result["rows"].append(r.to_dict())
        result[f"plan_{B}"] = plan_schedule.describe()
    if args.fid:
        extractor = feature_extractor(InceptionFeatures(None))
        if not Path(args.fid_stats).is_file():  # the demo's training images, cached
            images = build_dataset("demo", img_size=teacher.config.img_size, split="train",
                                   channels=teacher.config.in_channels, flip=False)
            reference_stats(args.fid_stats, images, extractor, split="train",
                            count=args.fid_ref, seed=0, batch_size=64, device="cpu")
        reference = load_reference(args.fid_stats)
        fids = {}
        # The exact samplers' samples are the sequential loop's to the tolerance (their
        # distance is in the table): FID is measured for the sequential loop and the students.
        measured = {k: m for k, m in fid_methods.items() if k.startswith("student")}
        for name, m in {"sequential": Method(SamplingSchedule.sequential()),
                        **measured}.items():
            fids[name], _ = fid_at_n(teacher, None, reference, extractor, num_samples=args.fid,
                                     seed=args.seed, batch_size=64,
                                     draw=lambda n, yy, m=m: m.run(teacher, n, yy, **knobs))
            print(f"FID@{args.fid} {name}: {fids[name]:.2f}", flush=True)
        result["fid"] = fids
        for r in result["rows"]:
            exact = r["method"].startswith(("teacher", "jacobi", "auto"))
            r["fid"] = fids.get("sequential" if exact else r["method"])
    (out / "pareto.json").write_text(json.dumps(result, indent=2, default=str))
    if args.fid:
        pts: dict[str, list[tuple[float, float]]] = {}
        for r in result["rows"]:
            name = "student K=1..8" if r["method"].startswith("student") else r["method"]
            pts.setdefault(f"{name} (B={r['batch']})", []).append(
                (r["seconds_per_image"], r["fid"]))
        chart(pts, "seconds per image (log)", f"FID@{args.fid}",
              f"student vs teacher, guidance {args.guidance}, tol {args.tol}",
              out / "pareto.png")
    if args.along and args.pairs:
        along(args, teacher, out, knobs, result)


def along(args, teacher, out: Path, knobs: dict, result: dict, name: str = "pareto.json"
          ) -> None:
    """Students along training runs: relative error vs passes per block of their guess (the
    last --held members of --pairs, which no student in --along may have trained on)."""
    pairs = PairSet(args.pairs, args.pairs_count)
    held = list(range(args.pairs_count - args.held, args.pairs_count))
    z, x, y = pairs.z[held], pairs.x[held], pairs.y[held]
    y = None if not teacher.config.conditional else y
    schedule = parse_schedule(f"{{else:S1/student}} tol={args.tol}")
    points = []
    for ckpt in args.along:
        student = load_for_sampling(ckpt, device="cpu").net
        err = float(relative_error(student.generate(z, y), x).mean())
        _, stats = sample(teacher, z, y, schedule, student=student, **knobs)
        points.append({"checkpoint": ckpt, "rel_err": err, "iters": stats.iters,
                       "total": sum(stats.iters.values())})
        print(f"{Path(ckpt).name}: rel err {err:.3e} passes {stats.iters}", flush=True)
    _, stats = sample(teacher, z, y, SamplingSchedule.jacobi(None, tol=args.tol), **knobs)
    result["along"] = points
    result["along_baseline_z"] = stats.iters
    (out / name).write_text(json.dumps(result, indent=2, default=str))
    points = sorted(points, key=lambda p: p["rel_err"])
    series = {f"block {b}": [(p["rel_err"], p["iters"][b]) for p in points]
              for b in sorted(points[0]["iters"])}
    series["critical path (sum)"] = [(p["rel_err"], p["total"]) for p in points]
    chart(series, "student relative error ||x^ - x||^2 / ||x||^2 (log)", "Jacobi passes",
          f"passes from the student's guess (tol {args.tol}; init z: "
          f"{sum(stats.iters.values())} in all)", out / "passes_vs_error.png")


if __name__ == "__main__":
    main()
