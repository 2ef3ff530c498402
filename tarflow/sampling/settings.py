"""Sampler settings from a plain dict: a ``tarflow/conf/sampler/*.yaml`` after
``OmegaConf.to_container``.

The same sampler files drive validation sampling, ``tarflow-sample``, ``tarflow-eval`` and the
benchmarks, so the translation into ring-1 objects lives in one place. This module imports neither
Hydra nor OmegaConf: callers convert their config to plain containers first.

A sampler dict has the keys ``name, schedule, tol, init, guidance, attn_temp, annealed,
guidance_rule, denoise, check_every, net_dtype, auto, planner, steps`` (``steps``: a
distilled student's Euler steps K, ``tarflow.model.student``; ``student``: a student
checkpoint whose guess starts the blocks with ``init: student``);
``schedule`` is "sequential", "jacobi[:J]", the paper's "[Stack-GS-J-Else]" notation, the
explicit ``{block:setting, ...}`` form, an explicit per-block dict, "auto" (the planner:
measured on the device and batch at run time, with a CRM/IGM ranking as its prior) or
"auto:paper" (the paper's fixed rule applied to the ranking).

``net_dtype`` says which network precision sampling may use for Jacobi passes:

- ``auto`` (the default; also null or unset): ``schedule: auto`` lets the planner consider a
  bfloat16 network, kept only where a pass measures faster and it moves the probe samples by no
  more than the tolerance does (``tarflow.sampling.planner``; the plan says which and why);
  other schedules run in full precision.
- ``float32`` (or ``float64``): never a low-precision network; fixed schedules run it in that
  dtype, the planner considers none.
- ``bfloat16`` / ``float16``: fixed schedules run every Jacobi block's network in it; the
  planner uses it wherever it measures faster, without the accuracy check (forced; the error
  is still measured and printed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tarflow.model import Guidance, TarFlow
from tarflow.model.student import Student
from tarflow.sampling.knobs import KNOBS, guidance_of, parse_knobs
from tarflow.sampling.plan import Plan, PlanCache, plan_key, ranking_moved
from tarflow.sampling.planner import PlannerOptions, Timer, plan_schedule
from tarflow.sampling.precision import dtype_name
from tarflow.sampling.ranking import BlockRank, schedule_from_ranking
from tarflow.sampling.schedule import SamplingSchedule, build_schedule
from tarflow.sampling.student import resolve_student

AUTO = "auto"  # the planner
PAPER = "auto:paper"  # the paper's fixed CRM/IGM rule
# net_dtype: "auto" lets the planner consider these, behind its accuracy check.
AUTO_NET_DTYPES = ("bfloat16",)
FULL_PRECISION = ("float32", "float64")
# Keys of the `auto` sub-dict, i.e. keyword arguments of schedule_from_ranking besides tol.
AUTO_KEYS = ("tough_factor", "tough_segments", "sequential_share", "tough_iters", "else_iters")
PLANNER_KEYS = ("rounds", "margin", "keep", "segments", "dtype_gain", "max_check_every")
KNOWN_KEYS = frozenset(("name", "schedule", "tol", "init", "auto", "planner", "check_every",
                        "net_dtype", "steps", "student", *KNOBS))
# Keys that existed once, with what replaced them (a clear error instead of "unknown key").
RETIRED = {"tune_segments": "segment counts are now timed by the planner: use schedule: auto"}


@dataclass(frozen=True)
class SamplerSettings:
    """A parsed sampler config.

    Attributes:
        name: display name (the config file's stem).
        schedule: a ready :class:`SamplingSchedule` (``check_every`` and ``net_dtype`` already
            applied to its blocks), or ``"auto"`` / ``"auto:paper"`` when it must come from the
            planner / the paper's rule at run time (see :meth:`schedule_for`).
        knobs: keyword arguments for :func:`tarflow.sampling.sample`, every name of
            ``tarflow.sampling.knobs.KNOBS``.
        tol: Jacobi stopping tolerance (also the planner's and the paper rule's).
        init: default initial guess.
        auto: keyword arguments for :func:`schedule_from_ranking` (besides ``tol``), used by
            ``auto:paper``; its ``tough_factor`` is also the planner's prior.
        net_dtype: "auto", or a dtype name (see the module docstring): which network precision
            the planner may consider and fixed schedules run.
        planner: keyword arguments for :class:`PlannerOptions`.
        check_every: convergence-test interval of fixed and ``auto:paper`` schedules (None: the
            schedule's; the planner chooses its own).
    """

    name: str
    schedule: SamplingSchedule | str
    knobs: dict[str, Any] = field(default_factory=dict)
    tol: float = 0.0
    init: str = "z"
    auto: dict[str, Any] = field(default_factory=dict)
    net_dtype: str = AUTO
    planner: dict[str, Any] = field(default_factory=dict)
    check_every: int | None = None

    @property
    def is_auto(self) -> bool:
        """Whether the schedule is decided at run time (and needs a CRM/IGM ranking)."""
        return isinstance(self.schedule, str)

    @property
    def is_planned(self) -> bool:
        return self.schedule == AUTO

    @property
    def guidance(self) -> Guidance:
        return guidance_of(self.knobs)

    @property
    def planner_options(self) -> PlannerOptions:
        """The planner's knobs: ``planner`` over the defaults, the ``auto`` rule's
        ``tough_factor`` as its prior."""
        tough = float(self.auto.get("tough_factor", PlannerOptions.tough_factor))
        return PlannerOptions(**{"tough_factor": tough, **self.planner})

    def resolve(self, ranking: list[BlockRank] | None, num_patches: int) -> SamplingSchedule:
        """The schedule of a fixed or ``auto:paper`` sampler (the planner needs
        :meth:`schedule_for`).

        Raises:
            ValueError: a run-time schedule without a ranking, or "auto" (use schedule_for).
        """
        if not self.is_auto:
            return self.schedule
        if self.is_planned:
            raise ValueError("schedule 'auto' is planned by measuring: use schedule_for()")
        if ranking is None:
            raise ValueError(f"sampler {self.name!r} uses schedule {self.schedule!r}, which "
                             f"needs a CRM/IGM ranking of the model's blocks on real images")
        schedule = schedule_from_ranking(ranking, num_patches, tol=self.tol, **self.auto)
        return _with_options(schedule, self.check_every, self.fixed_net_dtype)

    @property
    def fixed_net_dtype(self) -> str | None:
        """The network dtype of fixed schedules (None: the model's own)."""
        return None if self.net_dtype == AUTO else self.net_dtype

    @property
    def planner_net_dtypes(self) -> tuple[tuple[str, ...], bool]:
        """(low-precision dtypes the planner may consider, whether behind its accuracy check)."""
        if self.net_dtype == AUTO:
            return AUTO_NET_DTYPES, True
        if self.net_dtype in FULL_PRECISION:
            return (), True
        return (self.net_dtype,), False

    def schedule_for(self, net: TarFlow, ranking: list[BlockRank] | None, batch_size: int, *,
                     cache: PlanCache | None = None, weights: bool = True, seed: int = 0,
                     timer: Timer | None = None, student: Student | None = None
                     ) -> tuple[SamplingSchedule, Plan | None]:
        """The schedule to sample ``batch_size`` at a time with, and the plan behind it.

        For ``schedule: auto`` the plan comes from ``cache`` when one was made for the same key
        (:func:`plan_key`: weights or architecture, device, batch, dtypes, tolerance, guidance,
        planner options)
        and, for an architecture key, under a ranking that has not moved since
        (:func:`ranking_moved`); otherwise it is measured (:func:`plan_schedule`) and stored.

        Args:
            weights: key on the weights' fingerprint (fixed weights: the CLIs) or only on the
                architecture (training, where the ranking decides when to re-plan).
            timer: the planner's cost override (tests), see :func:`plan_schedule`.
            student: a distilled student the planner may start blocks from (default: the
                one ``sampler.student`` names, if any).
        """
        if not self.is_planned:
            return self.resolve(ranking, net.config.num_patches), None
        allowed, gate = self.planner_net_dtypes
        student = self.student_for(net, student)
        key = self.plan_key(net, batch_size, weights=weights, student=student)
        shares = {r.block: r.share for r in ranking} if ranking else None
        plan = cache.get(key) if cache is not None else None
        options = self.planner_options
        if plan is None or ranking_moved(plan.shares, shares, tough_factor=options.tough_factor):
            plan = plan_schedule(net, ranking, batch_size=batch_size, tol=self.tol,
                                 guidance=self.guidance, net_dtypes=allowed,
                                 precision_gate=gate, seed=seed, options=options, timer=timer,
                                 student=student, student_steps=self.knobs.get("steps"))
            plan.key = key
            if cache is not None:
                cache.put(plan)
        return plan.schedule, plan

    def plan_key(self, net: TarFlow, batch_size: int, *, weights: bool = True,
                 student: Student | None = None) -> dict[str, Any]:
        """The cache key of this sampler's plans for ``net`` at ``batch_size``
        (:func:`plan_key`, the one place a key is built)."""
        allowed, gate = self.planner_net_dtypes
        return plan_key(net, batch_size=batch_size, tol=self.tol, guidance=self.guidance,
                        net_dtypes=allowed, precision_gate=gate, weights=weights,
                        options=self.planner_options,
                        student=self.student_for(net, student),
                        student_steps=self.knobs.get("steps"))

    def student_for(self, net: TarFlow, student: Student | None = None) -> Student | None:
        """The student the planner is offered: ``student``, else the checkpoint that
        ``sampler.student`` names (loaded once per process), else None."""
        if student is not None:
            return student
        return resolve_student(self.knobs.get("student"), next(net.parameters()))


def parse_sampler(config: Mapping[str, Any] | None) -> SamplerSettings:
    """Turn a plain sampler dict into :class:`SamplerSettings`.

    Missing keys take the sequential sampler's defaults; unknown keys are an error so a typo
    (``guidence: 2``) cannot silently sample without guidance.

    Args:
        config: the sampler dict, or None for plain sequential sampling.

    Raises:
        ValueError: unknown keys, or a schedule string the parser rejects.
    """
    cfg = dict(config or {})
    retired = sorted(set(cfg) & set(RETIRED))
    if retired:
        raise ValueError(f"sampler option {retired[0]!r} was removed: {RETIRED[retired[0]]}")
    unknown = sorted(set(cfg) - KNOWN_KEYS)
    if unknown:
        raise ValueError(f"unknown sampler option(s) {unknown}; known: {sorted(KNOWN_KEYS)}")
    auto_cfg = _sub_dict(cfg, "auto", AUTO_KEYS)
    planner = _sub_dict(cfg, "planner", PLANNER_KEYS)
    if "segments" in planner:
        planner["segments"] = tuple(int(v) for v in planner["segments"])
    PlannerOptions(**planner)  # bad values fail now, not at the first validation
    tol = float(cfg.get("tol") or 0.0)
    init = str(cfg.get("init") or "z")
    # Validated now (a typo fails at start-up) and kept as a plain, serialisable string.
    net_dtype = parse_net_dtype(cfg.get("net_dtype"))
    check_every = cfg.get("check_every")
    spec = cfg.get("schedule", "sequential")
    if isinstance(spec, str) and spec.strip().lower() in (AUTO, PAPER):
        schedule: SamplingSchedule | str = spec.strip().lower()
    else:
        schedule = _with_options(build_schedule(spec, init=init, tol=tol), check_every,
                                 None if net_dtype == AUTO else net_dtype)
    knobs = parse_knobs(cfg)
    if cfg.get("steps") is not None:  # a distilled student's Euler steps K (null: its default)
        knobs["steps"] = int(cfg["steps"])
        if knobs["steps"] < 1:
            raise ValueError(f"sampler.steps={cfg['steps']} must be >= 1 (a student's K)")
    if cfg.get("student"):  # a student checkpoint: the guess of blocks with init "student"
        knobs["student"] = str(cfg["student"])
    guidance_of(knobs)  # an unknown rule fails now, naming the known ones
    name = str(cfg.get("name") or (spec if isinstance(spec, str) else "custom"))
    return SamplerSettings(name, schedule, knobs, tol, init, auto_cfg, net_dtype, planner,
                           None if check_every is None else int(check_every))


def parse_net_dtype(value: Any) -> str:
    """``net_dtype`` of a sampler config: "auto" (also None, "none", "") or a canonical dtype
    name ("bfloat16", "float32", ...; aliases such as bf16 accepted).

    Raises:
        ValueError: one line naming the accepted values.
    """
    if value is None or str(value).strip().lower() in (AUTO, "", "none", "null"):
        return AUTO
    try:
        name = dtype_name(str(value).strip())
    except ValueError:
        name = None
    if name is None:
        raise ValueError(f"unknown net_dtype {value!r}: use auto (the planner considers "
                         f"bfloat16), float32 (never low precision), bfloat16 or float16")
    return name


def _with_options(schedule: SamplingSchedule, check_every: int | None,
                  net_dtype: str | None) -> SamplingSchedule:
    """A fixed schedule with the config's test interval and network dtype on every block."""
    if check_every is not None:
        schedule = schedule.with_settings(check_every=int(check_every))
    if net_dtype is not None:
        schedule = schedule.with_settings(net_dtype=net_dtype)
    return schedule


def _sub_dict(cfg: dict[str, Any], key: str, known: tuple[str, ...]) -> dict[str, Any]:
    sub = dict(cfg.get(key) or {})
    bad = sorted(set(sub) - set(known))
    if bad:
        raise ValueError(f"unknown sampler.{key} option(s) {bad}; known: {list(known)}")
    return sub
