"""tarflow-bench: sequential vs Jacobi vs GS-Jacobi on the same weights, noise, labels and batch.

A latent model (its checkpoint records an autoencoder) is timed in latent space, as it samples;
decoding the latents to images is timed on its own and printed after the tables (it is the same
for every sampler, and does not belong in their speed-ups).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from functools import partial

import torch

from tarflow.app.checks.common import refuse_fid_inputs, refuse_low_counts, refuse_unwritable
from tarflow.app.cli_args import add_data_args, add_model_args, fail, model_from_args, probe_images
from tarflow.eval import InceptionFeatures, load_reference
from tarflow.eval.bench import Method, benchmark, compiled_copy, format_table, median_time
from tarflow.eval.fid_at_n import feature_extractor, fid_at_n
from tarflow.files import atomic_write
from tarflow.model import CheckpointError
from tarflow.model.autoencoder import AutoencoderError
from tarflow.model.guidance import RULES
from tarflow.model.loading import load_for_sampling
from tarflow.model.student import is_student
from tarflow.sampling import (
    PlanCache,
    SamplingSchedule,
    build_schedule,
    rank_blocks,
    schedule_from_ranking,
)
from tarflow.sampling.knobs import GUIDANCE_KNOBS, KNOBS
from tarflow.sampling.precision import dtype_name
from tarflow.sampling.sample_set import fixed_inputs
from tarflow.sampling.schedule import INITS
from tarflow.sampling.settings import SamplerSettings, parse_sampler


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tarflow-bench",
        description="Time samplers side by side in one process: medians over repeats after "
        "warm-up, errors against the sequential loop on the same noise, one table per batch.",
        epilog="methods: 'sequential', 'jacobi' (to --tol), 'jacobi:J' (J iterations per block), "
        "'auto' (the planner: per block the fastest of sequential / Jacobi / GS-Jacobi, timed on "
        "this device at each batch size; plans are cached in --plan-cache), 'auto:paper' (the "
        "paper's fixed rule on the CRM/IGM ranking), 'plain:J' (the GS-Jacobi authors' loop: J "
        "full passes per block, no stopping test), the paper's notation such as '[3-8-32-10]' or "
        "the explicit form '{3:S4/zeros, else:S1}'. A suffix '@bf16' runs that method's Jacobi "
        "iterations with a bfloat16 network; iterates and stopping test keep --dtype. 'auto' "
        "considers a bf16 network by default and keeps it only where a pass measures faster "
        "and the samples stay within --tol of fp32 (its printed plan says why); 'auto@bf16' "
        "forces it wherever faster (error printed, not enforced), 'auto@fp32' never uses it. "
        "A distilled student's checkpoint is timed against its teacher: 'student:K' samples "
        "with the student alone in K steps (not a bijection, no likelihood: its error is its "
        "distance from the teacher), '--init student' starts the teacher's Jacobi methods "
        "from its guess (exact to --tol). "
        "Example: tarflow-bench last.ckpt --data demo --batch 1 4 16 --methods jacobi auto")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--methods", nargs="+", default=["jacobi", "auto"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--tol", type=float, default=1e-3, help="stopping tolerance for every method")
    p.add_argument("--init", default="z", choices=INITS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--guidance", type=float, default=0.0)
    p.add_argument("--attn-temp", type=float, default=1.0)
    p.add_argument("--annealed", action="store_true")
    p.add_argument("--guidance-rule", default="linear", choices=sorted(RULES),
                   help="linear (TarFlow) or starflow (STARFlow's Gaussian rule)")
    p.add_argument("--plan-cache", default="data/sampling_plans.json", help="JSON file of the "
                   "planner's plans, shared with tarflow-sample/-eval ('' = plan afresh)")
    p.add_argument("--concat-baseline", action="store_true", help="also time the sequential loop "
                   "with a torch.cat-grown KV cache, as in the reference code")
    p.add_argument("--denoise", type=float, default=0.0, help="self-denoising multiplier for the "
                   "FID samples (one backward pass, the same for every method: not timed)")
    p.add_argument("--fid", type=int, default=0, metavar="N", help="also FID@N of every method "
                   "on the same N per-sample-seeded noises and labels (not timed)")
    p.add_argument("--fid-stats", help="reference statistics: our .npz cache (sampling "
                   "callback, tarflow-eval, scripts/prepare_fid_stats.py), an official "
                   "{dataset}_{img_size}_fid_stats.pth or a plain mu/sigma .npz")
    p.add_argument("--fid-batch", type=int, default=50)
    p.add_argument("--inception-weights", help="local Inception weights file (default: torch "
                   "hub's checkpoints dir, see tarflow-fid-weights)")
    p.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                   choices=["default", "reduce-overhead", "max-autotune"],
                   help="also time every method (and the sequential loop) with each block's "
                   "network pass torch.compile'd (inductor, dynamic shapes; MODE: default, "
                   "reduce-overhead, max-autotune), as rows '<method>+compile' in the same "
                   "round-robin (speed-ups against the eager sequential loop); the first "
                   "compiled call of each (compile + run) is printed")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--teacher", help="a student CHECKPOINT's teacher, where its recorded path is "
                   "not on this machine (a student is timed against its teacher)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    return p


def resolve_methods(args, model, space=None) -> tuple[dict[str, Method], str]:
    methods, note = {}, ""
    ranking = None
    for spec in args.methods:
        m, _, dtype = spec.partition("@")
        try:
            dtype = dtype_name(dtype) if dtype else None
        except ValueError as err:
            fail(f"method {spec!r}: {err}")
        suffix = f"@{dtype}" if dtype else ""
        if m == "sequential":
            continue  # always run first as the reference
        if m.startswith("student:"):
            if args.student is None:
                fail(f"method {spec!r} needs a student checkpoint (give one as CHECKPOINT)")
            try:
                steps = int(m.split(":", 1)[1])
            except ValueError:
                fail(f"method {spec!r}: student:K needs a step count, e.g. student:2")
            methods[m] = Method(SamplingSchedule.sequential(), student=args.student, steps=steps)
            continue
        if m.startswith("plain:"):
            try:
                iters = int(m.split(":", 1)[1])
            except ValueError:
                fail(f"method {spec!r}: plain:J needs an iteration count, e.g. plain:10")
            methods[m] = Method(SamplingSchedule.jacobi(iters, init=args.init), plain_iters=iters)
            continue
        if m in ("auto", "auto:paper"):
            if ranking is None:
                images, where = probe_images(args, model, space)
                ranking = rank_blocks(model, images)
                note = f"CRM/IGM ranking on {where}"
            paper = schedule_from_ranking(ranking, model.config.num_patches, tol=args.tol)
            name = {"auto": "auto", "auto:paper": "auto_paper"}[m]
            methods[name + suffix] = Method(paper, dtype, plan=m == "auto",
                                            student=args.student)
            continue
        try:
            schedule = build_schedule(m, init=args.init, tol=args.tol)
            # Blocks and segment counts must exist in this model (else: an IndexError later).
            schedule.validate(model.config.num_blocks, model.config.num_patches)
        except ValueError as err:
            fail(f"method {spec!r}: {err}")
        name = "jacobi" if m.startswith("jacobi") else "gs_jacobi"
        key = (m if name == "gs_jacobi" or ":" in m else name) + suffix
        methods[key] = Method(schedule, dtype, student=args.student)
    return methods, (note, ranking)


def planned_settings(args, net_dtype: str | None) -> SamplerSettings:
    """The sampler settings of method ``auto``: the sampler configs' planner with this
    command's tolerance, guidance and dtype, so a plan (and its cache key) is the one
    ``tarflow-sample`` / ``tarflow-eval`` make with the same settings."""
    return parse_sampler({"schedule": "auto", "tol": args.tol, "init": args.init,
                          "net_dtype": net_dtype,
                          **{k: getattr(args, k) for k in GUIDANCE_KNOBS}})


def decide_methods(args, model, methods: dict[str, Method], ranking, batch: int, seed: int
                   ) -> dict[str, Method]:
    """Methods whose schedule depends on the batch (the planner's, cached in
    ``--plan-cache``), decided now."""
    out = {}
    cache = PlanCache(args.plan_cache) if args.plan_cache else None
    for name, m in methods.items():
        if m.plan:
            settings = planned_settings(args, m.net_dtype)
            schedule, plan = settings.schedule_for(model, ranking, batch, cache=cache,
                                                   seed=seed, student=m.student)
            print(f"{name} at batch {batch}: {plan.table()}")
            out[name] = replace(m, schedule=schedule)
    return out


def fid_per_method(args, model, methods: dict[str, Method], space) -> dict[str, float]:
    """FID@N of each method (and sequential) on the fixed sample set: member i from seed
    ``--seed + i``, as in validation and ``tarflow-eval`` (a latent model's samples decoded)."""
    if not args.fid_stats:
        fail("--fid needs --fid-stats (reference statistics of the data)")
    try:
        reference = load_reference(args.fid_stats, expect={"img_size": space.image_shape[1]})
        extractor = feature_extractor(InceptionFeatures(args.inception_weights),
                                      device=args.device)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    knobs = {k: getattr(args, k) for k in KNOBS}
    out = {}
    for name, method in {"sequential": Method(SamplingSchedule.sequential()), **methods}.items():
        out[name], _ = fid_at_n(model, None, reference, extractor, num_samples=args.fid,
                                seed=args.seed, batch_size=args.fid_batch, space=space,
                                draw=partial(method.run, model, **knobs))
    return out


def with_compiled(methods: dict[str, Method], net, model, noise, y, knobs) -> dict[str, Method]:
    """``methods`` plus, for each and for the sequential loop, a twin running ``net`` (the
    compiled copy), each called once here so that its compile is paid (and printed) untimed."""
    twins = {f"{name}+compile": replace(m, net=net) for name, m in
             {"sequential": Method(SamplingSchedule.sequential()), **methods}.items()}
    for name, m in twins.items():
        t0 = time.perf_counter()
        m.run(model, noise, y, **knobs)
        print(f"{name}: first call (compile + run) {time.perf_counter() - t0:.1f} s")
    return {**methods, **twins}


# Counts that must be at least this much (the value 0 would fail deep inside a sampler).
MINIMUM = {"batch": 1, "repeats": 1, "warmup": 0, "fid": 0, "fid_batch": 1, "probe": 1,
           "threads": 1}
# Methods that were removed, and what replaced them (as RETIRED in tarflow.sampling.settings).
RETIRED_METHODS = {"auto:tuned": "the planner times segment counts now: use 'auto'"}


def refuse_retired_methods(methods: list[str]) -> None:
    """Name a removed method and its replacement, in one line, before the model is loaded."""
    for spec in methods:
        if (m := spec.partition("@")[0]) in RETIRED_METHODS:
            fail(f"method {m!r} was removed: {RETIRED_METHODS[m]}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    refuse_low_counts(args, MINIMUM)
    refuse_unwritable(args, files={"json": "--json"})
    refuse_retired_methods(args.methods)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, space = model_from_args(args)
    args.student = None
    if is_student(model):  # time the student against its teacher on the same noise
        args.student, model, space = model, *load_teacher(args, model)
        print(f"student {args.checkpoint} of teacher {model.config.tag} "
              f"({args.student.teacher.get('path')}): methods student:K sample with the "
              f"student alone; init 'student' (--init student, or '/student' in a schedule) "
              f"starts the teacher's Jacobi from its guess")
    refuse_fid_inputs(args.fid, args.fid_stats, args.inception_weights, space.image_shape[1])
    methods, (note, ranking) = resolve_methods(args, model, space)
    cfg = model.config
    if space.latent:
        print(f"latent model: {space.describe()}; sampling is timed in latent space, "
              f"decoding separately")
    print(f"model {cfg.tag} img {cfg.img_size} N={cfg.num_patches} classes {cfg.num_classes}; "
          f"device {args.device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), dtype {args.dtype}; tol {args.tol}; "
          f"median of {args.repeats} after {args.warmup} warm-up")
    if note:
        print(note)
    all_rows, decode = [], []
    fid_methods = methods
    compiled = None
    if args.compile:
        compiled = compiled_copy(model, mode=None if args.compile == "default" else args.compile)
    if any(m.plan for m in methods.values()) and len(args.batch) > 1:
        print(f"note: FID of planned methods uses their schedule for batch {args.batch[0]}")
    for B in args.batch:
        noise, y = fixed_inputs(model, range(B), args.seed)  # the set's first B members
        knobs = {k: getattr(args, k) for k in GUIDANCE_KNOBS}
        decided = decide_methods(args, model, methods, ranking, B, args.seed + 1)
        methods_b = {**methods, **decided}
        if B == args.batch[0]:
            fid_methods = methods_b  # FID uses the schedules planned for the first batch size
        if compiled is not None:
            methods_b = with_compiled(methods_b, compiled, model, noise, y, knobs)
        rows = benchmark(model, noise, y, methods_b, repeats=args.repeats, warmup=args.warmup,
                         concat_baseline=args.concat_baseline, **knobs)
        print(format_table(rows))
        all_rows += rows
        if space.latent:
            decode.append(decode_cost(space, rows[0], noise, model, args))
    if args.fid:
        fids = fid_per_method(args, model, fid_methods, space)
        for r in all_rows:
            # The torch.cat loop produces the sequential loop's images bit for bit.
            r.fid = fids.get("sequential" if r.method == "sequential_cat" else r.method)
        print(f"FID@{args.fid} (same noise and labels for every method, denoise "
              f"{args.denoise}, reference {args.fid_stats}):")
        for name, value in fids.items():
            print(f"  {name}: {value:.3f} ({100 * (value / fids['sequential'] - 1):+.2f}% vs "
                  f"sequential)")
    for d in decode:
        print(f"decode (autoencoder, not in the times above): batch {d['batch']}: "
              f"{d['seconds'] * 1e3:.1f} ms ({d['seconds_per_image'] * 1e3:.2f} ms/image, "
              f"{d['vs_sequential']:.2f}x the sequential sampler's time)")
    if args.json:
        record = {"args": vars(args), "rows": [r.to_dict() for r in all_rows],
                  **({"decode": decode} if decode else {})}
        atomic_write(args.json, json.dumps(record, indent=2))
    return 0


def load_teacher(args, student):
    """The teacher a student checkpoint records (``--teacher`` overrides its path)."""
    path = args.teacher or student.teacher.get("path")
    if not path:
        fail("this student records no teacher path: give --teacher")
    try:
        loaded = load_for_sampling(path, device=args.device, dtype=args.dtype)
    except (AutoencoderError, CheckpointError) as err:
        fail(str(err))
    return loaded.net, loaded.space


def decode_cost(space, sequential, noise, model, args) -> dict[str, float]:
    """Median seconds to decode one batch of latents of the sampler's output shape, timed like
    the samplers: what a latent model adds per batch on top of any sampler."""
    latents = model.unpatchify(noise)  # (B, c, h, w); decoding costs the same for any values
    seconds, _ = median_time(lambda: space.decode(latents), repeats=args.repeats,
                             warmup=max(1, args.warmup), device=noise.device)
    B = noise.shape[0]
    return {"batch": B, "seconds": seconds, "seconds_per_image": seconds / B,
            "vs_sequential": seconds / sequential.seconds}


if __name__ == "__main__":
    raise SystemExit(main())
