"""Measure what the speed loss terms (tarflow/sampling/speed_losses.py) buy: several checkpoints
side by side in one process (docs/benchmarks.md, "Training for fast sampling").

    # Jacobi iterations per block at a tolerance (no timing; any load)
    python scripts/speed_terms_eval.py iters base=demo.ckpt chain=outputs/x/last.ckpt --json it.json
    # `auto` vs the sequential loop at batch 1/16/64, round-robin over checkpoints (timing)
    python scripts/speed_terms_eval.py speed base=demo.ckpt chain=... --json speed.json
    # one training step's cost with each term on (timing)
    python scripts/speed_terms_eval.py step base=demo.ckpt --terms '{chain: {kind: chain, ...}}'
    # per-block Jacobi iterations of the validation rounds over a run (sampler=jacobi), as a PNG
    python scripts/speed_terms_eval.py curve term=outputs/ft control=outputs/ft0 --png it.png

``iters``: pure Jacobi (every block, initial guess z) to ``--tol`` on the same noise and labels
for every checkpoint: per block the iterations the slowest sample needed, at batch 16 one batch,
at batch 1 the mean over ``--singles`` single-image runs; the critical path is their sum.
``speed`` calls tarflow-bench's ``main`` per (batch, checkpoint), batches outermost, so load
drift hits every checkpoint alike; each row's speed-up is against the sequential loop timed in
the same call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import yaml

from tarflow.cli import bench
from tarflow.model import TarFlow
from tarflow.sampling import SamplingSchedule, sample
from tarflow.sampling.speed_losses import parse_speed_terms


def _named(specs: list[str]) -> dict[str, str]:
    out = {}
    for spec in specs:
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"error: expected name=checkpoint, got {spec!r}")
        out[name] = path
    return out


def jacobi_iters(model: TarFlow, batch: int, *, tol: float, seed: int, guidance: float
                 ) -> dict[int, int]:
    """Per forward block, the Jacobi iterations the slowest of ``batch`` samples needed."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    noise = model.sample_noise(batch, generator=g)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g) if cfg.conditional else None
    _, stats = sample(model, noise, y, SamplingSchedule.jacobi(None, init="z", tol=tol),
                      guidance=guidance)
    return stats.iters


def cmd_iters(args) -> dict:
    out = {}
    for name, path in _named(args.checkpoints).items():
        model = TarFlow.from_checkpoint(path).eval()
        row = {}
        for B in args.batch:
            if B == 1:
                runs = [jacobi_iters(model, 1, tol=args.tol, seed=args.seed + i,
                                     guidance=args.guidance) for i in range(args.singles)]
                blocks = {b: statistics.mean(r[b] for r in runs) for b in runs[0]}
            else:
                blocks = jacobi_iters(model, B, tol=args.tol, seed=args.seed,
                                      guidance=args.guidance)
            row[B] = {"blocks": blocks, "critical_path": sum(blocks.values())}
            print(f"{name} batch {B}: blocks 0..T-1 "
                  f"{' / '.join(f'{v:g}' for v in blocks.values())}, critical path "
                  f"{row[B]['critical_path']:g}", flush=True)
        out[name] = row
    return out


def cmd_speed(args) -> dict:
    out = {name: {} for name in _named(args.checkpoints)}
    tmp = Path(args.json or "speed.json").with_suffix(".rows.json")
    for B in args.batch:
        for name, path in _named(args.checkpoints).items():
            print(f"== {name} batch {B}", flush=True)
            bench.main([path, "--data", "demo", "--batch", str(B), "--methods", "auto",
                        "--tol", str(args.tol), "--repeats", str(args.repeats),
                        "--plan-cache", "", "--guidance", str(args.guidance),
                        "--json", str(tmp)])
            rows = {r["method"]: r for r in json.loads(tmp.read_text())["rows"]}
            out[name][B] = {"auto_speedup": rows["auto"]["speedup"],
                            "auto_seconds": rows["auto"]["seconds"],
                            "sequential_seconds": rows["sequential"]["seconds"],
                            "auto_schedule": rows["auto"]["schedule"]}
    tmp.unlink(missing_ok=True)
    return out


def cmd_step(args) -> dict:
    """Median seconds of one training step (batch 32, AdamW) with each term set on."""
    path = next(iter(_named(args.checkpoints).values()))
    torch.set_num_threads(args.threads)
    variants = {"nll": {}, **{k: {k: v} for k, v in (yaml.safe_load(args.terms) or {}).items()}}
    runs = {}
    for name, spec in variants.items():
        torch.manual_seed(0)
        model = TarFlow.from_checkpoint(path).train()
        terms = parse_speed_terms(spec, model.config)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        cfg = model.config
        x = torch.rand(args.step_batch, cfg.in_channels, cfg.img_size, cfg.img_size) * 2 - 1
        y = torch.randint(cfg.num_classes, (args.step_batch,)) if cfg.conditional else None
        gen = torch.Generator().manual_seed(0)

        def step(model=model, opt=opt, x=x, y=y, terms=terms, gen=gen):
            opt.zero_grad(set_to_none=True)
            out = model(x, y)
            loss = (model.prior_nll(out.z) - out.logdet).mean()
            for t in terms:
                loss = loss + t.weight * t.combine(
                    t.block_values(model, model.patchify(x), out.block_outputs, y, generator=gen))
            loss.backward()
            opt.step()

        runs[name] = step
        step()  # warm-up
    times = {name: [] for name in runs}
    for _ in range(args.rounds):  # round-robin: load drift hits every variant alike
        for name, step in runs.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["nll"])
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {"seconds": med, "vs_nll": med / base}
        print(f"{name}: {med * 1e3:.1f} ms/step ({med / base:.2f}x the NLL-only step)")
    return out


def _series(csv_path: Path, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of every logged value of ``key`` in a Lightning CSV log."""
    import csv

    steps, values = [], []
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            if row.get(key):
                steps.append(int(row["step"]))
                values.append(float(row[key]))
    return steps, values


def cmd_curve(args) -> dict:
    """``sampling/iters/<b>`` of each run's validation rounds against the training step, one
    panel per block (runs as lines): with a fixed Jacobi sampler (``sampler=jacobi``) these are
    the Jacobi iterations of the round's batches, comparable across rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {name: next(Path(run).glob("csv/version_*/metrics.csv"))
            for name, run in _named(args.checkpoints).items()}
    head = next(iter(runs.values())).read_text().splitlines()[0].split(",")
    blocks = sorted(int(k.rsplit("/", 1)[1]) for k in head if k.startswith("sampling/iters/"))
    if not blocks:
        raise SystemExit("error: no sampling/iters/<block> in the CSV log (was a validation "
                         "round with sampling run?)")
    out = {name: {b: _series(log, f"sampling/iters/{b}") for b in blocks}
           for name, log in runs.items()}
    fig, axes = plt.subplots(1, len(blocks) + 1, figsize=(2.6 * (len(blocks) + 1), 2.9),
                             sharex=True)
    # The last panel: what the iterations cost in likelihood, at the same steps.
    for i, log in enumerate(runs.values()):
        axes[-1].plot(*_series(log, "val/bpd"), marker="os^v"[i % 4], ms=4 if i else 3,
                      color=f"C{i}", ls="-" if i == 0 else "--", mfc="none" if i else None)
    axes[-1].set_title("val bits/dim", fontsize=9)
    axes[-1].set_xlabel("training step", fontsize=8)
    axes[-1].grid(alpha=0.3)
    axes[-1].tick_params(labelsize=7)
    for ax, b in zip(axes[:-1], blocks, strict=True):
        for i, (name, series) in enumerate(out.items()):
            # Dashed, hollow later runs: equal series (the easy blocks) stay visible.
            ax.plot(*series[b], marker="os^v"[i % 4], ms=4 if i else 3, color=f"C{i}",
                    ls="-" if i == 0 else "--", mfc="none" if i else None, label=name)
        ax.set_title(f"forward block {b}", fontsize=9)
        ax.set_xlabel("training step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        ax.set_ylim(bottom=0)
    axes[0].set_ylabel("Jacobi iterations per batch", fontsize=8)
    axes[0].legend(fontsize=7)
    fig.suptitle(args.title, fontsize=9)
    fig.tight_layout()
    fig.savefig(args.png, dpi=130)
    for name, series in out.items():
        for b in blocks:
            print(f"{name} block {b}: " + ", ".join(f"{st}:{v:g}" for st, v in
                                                    zip(*series[b], strict=True)))
    print(f"wrote {args.png}")
    return {name: {b: {"steps": st, "iters": v} for b, (st, v) in series.items()}
            for name, series in out.items()}


def _last(csv_path: Path, key: str) -> float | None:
    """The last logged value of ``key`` in a Lightning CSV log (None if never logged)."""
    import csv

    value = None
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            if row.get(key):
                value = float(row[key])
    return value


def _merged(paths: list[str] | None) -> dict:
    """The ``result`` dicts of several ``iters`` / ``speed`` JSON files, later files winning."""
    out: dict = {}
    for path in paths or []:
        out.update(json.loads(Path(path).read_text())["result"])
    return out


def cmd_report(args) -> dict:
    """Markdown table and a Pareto chart (bpd change vs critical path) from the runs' CSV logs and
    the JSON files of ``iters`` / ``speed`` (and the ``step`` costs printed); ``checkpoints`` are
    name=run_dir. Each row is compared with its own no-term run (``--ref name=ref_name``; by
    default the first), so fine-tunes and from-scratch runs share one chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iters, speed = _merged(args.iters), _merged(args.speed)
    if args.step:  # one row per term kind, not per run
        for name, v in json.loads(Path(args.step).read_text())["result"].items():
            print(f"step cost {name}: {v['seconds'] * 1e3:.0f} ms ({v['vs_nll']:.2f}x)")
    labels = dict(s.split("=", 1) for s in args.label)
    names = _named(args.checkpoints)
    first = next(iter(names))
    refs = {name: first for name in names} | dict(s.split("=", 1) for s in args.ref)
    for name, ref in refs.items():
        if ref not in names:
            raise SystemExit(f"error: --ref {name}={ref}: {ref!r} is not one of the runs")
    metrics = {}
    for name, run in names.items():
        log = next(Path(run).glob("csv/version_*/metrics.csv"))
        metrics[name] = (_last(log, "val/bpd"), _last(log, f"val/fid_{args.fid_n}"))
    rows = []
    for name in names:
        (bpd, fid), ref_bpd = metrics[name], metrics[refs[name]][0]
        it, sp = iters[name], speed.get(name, {})
        rows.append(dict(name=name, label=labels.get(name, name), ref=refs[name], bpd=bpd,
                         fid=fid, dbpd=100 * (bpd / ref_bpd - 1), b1=it["1"], b16=it["16"],
                         speed={B: v["auto_speedup"] for B, v in sp.items()}))
    head = ("| run | val bpd | vs its no-term run | FID@100 | iters b=1 (blocks 0/1/2/3) "
            "| crit. b=1 | iters b=16 | crit. b=16 | auto vs seq. b=1 / 16 / 64 |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        fmt = lambda d: " / ".join(f"{v:g}" for v in d["blocks"].values())  # noqa: E731
        sp = " / ".join(f"{r['speed'][B]:.2f}x" for B in ("1", "16", "64") if B in r["speed"])
        fid = "-" if r["fid"] is None else f"{r['fid']:.1f}"
        vs = "(reference)" if r["ref"] == r["name"] else f"{r['dbpd']:+.2f}%"
        lines.append(
            f"| {r['label']} | {r['bpd']:.4f} | {vs} | "
            f"{fid} | {fmt(r['b1'])} | {r['b1']['critical_path']:g} | {fmt(r['b16'])} | "
            f"{r['b16']['critical_path']:g} | {sp or '-'} |")
    table = "\n".join(lines)
    print(table)
    if not args.png:  # a table only
        return {"rows": rows, "table": table}
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    shown = [r for r in rows if r["dbpd"] <= 5]  # a far point would squash the rest
    groups = list(dict.fromkeys(r["ref"] for r in rows))  # one colour per no-term reference
    for i, r in enumerate(shown):
        color = f"C{groups.index(r['ref'])}"
        ax.scatter(r["dbpd"], r["b16"]["critical_path"], marker="o", s=32, color=color)
        ax.scatter(r["dbpd"], r["b1"]["critical_path"], marker="s", s=28,
                   facecolors="none", edgecolors=color)
        if r["ref"] != r["name"]:  # the references all sit at x = 0: the legend names them
            ax.annotate(r["label"], (r["dbpd"], r["b16"]["critical_path"]), fontsize=7,
                        xytext=(5, 4 if i % 2 == 0 else -9), textcoords="offset points")
    ax.axvline(0.5, color="grey", ls=":", lw=1)
    ax.axhline(args.target, color="grey", ls="--", lw=1)
    ax.text(0.5, args.target + 0.3, " target: +0.5% bpd, critical path <= "
            f"{args.target:g}", fontsize=7, color="grey")
    ax.set_ylim(bottom=min(args.target - 1, ax.get_ylim()[0]))
    off = [r["label"] for r in rows if r not in shown]
    if off:
        ax.text(0.99, 0.02, "off the chart (bpd > +5%): " + ", ".join(off), fontsize=6,
                ha="right", transform=ax.transAxes, color="grey")
    ax.scatter([], [], marker="o", color="grey", label="batch 16")
    ax.scatter([], [], marker="s", facecolors="none", edgecolors="grey",
               label="batch 1 (mean of singles)")
    for g, ref in enumerate(groups):
        ax.scatter([], [], marker="o", color=f"C{g}", label=f"vs {labels.get(ref, ref)} (x = 0)")
    ax.set_xlabel("val bits/dim change vs the same recipe without a term (%)")
    ax.set_ylabel(f"Jacobi passes on the critical path, tol {args.tol:g}")
    ax.set_title("Speed terms: likelihood cost vs GS-Jacobi iterations (demo model)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.png, dpi=130)
    print(f"wrote {args.png}")
    return {"rows": rows, "table": table}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["iters", "speed", "step", "report", "curve"])
    p.add_argument("checkpoints", nargs="+", help="name=path pairs")
    p.add_argument("--batch", type=int, nargs="+", default=None)
    p.add_argument("--tol", type=float, default=3e-3)
    p.add_argument("--guidance", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--singles", type=int, default=8, help="batch-1 runs averaged (iters)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--terms", default="{}", help="step: YAML {name: term spec}")
    p.add_argument("--step-batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    p.add_argument("--iters", nargs="+", help="report: the JSON files of `iters`")
    p.add_argument("--speed", nargs="*", help="report: the JSON files of `speed`")
    p.add_argument("--step", help="report: the JSON of `step`")
    p.add_argument("--label", nargs="*", default=[], help="report: name=label for the table")
    p.add_argument("--ref", nargs="*", default=[],
                   help="report: name=ref_name, the run without a term that row is compared with")
    p.add_argument("--fid-n", type=int, default=100)
    p.add_argument("--png", default="docs/speed_terms_pareto.png",
                   help="report / curve: the chart ('' = report without a chart)")
    p.add_argument("--title", default="Jacobi iterations per block during the run",
                   help="curve: the chart's title")
    p.add_argument("--target", type=float, default=14, help="report: critical-path target line")
    args = p.parse_args(argv)
    if args.batch is None:
        args.batch = {"iters": [1, 16], "speed": [1, 16, 64]}.get(args.mode, [])
    result = {"iters": cmd_iters, "speed": cmd_speed, "step": cmd_step,
              "report": cmd_report, "curve": cmd_curve}[args.mode](args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "result": result}, indent=1))


if __name__ == "__main__":
    main()
