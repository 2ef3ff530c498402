"""Sampling plans as data: what the planner chose per block, what it measured, and a JSON cache.

A :class:`Plan` holds the :class:`SamplingSchedule` the planner returns plus the evidence behind
it: for every block each candidate's measured seconds (a lower bound when the candidate was
abandoned for running over budget; the sequential loop's is then extrapolated from its steps),
the predicted total, the sequential total and the planning cost. It round-trips through JSON,
and :class:`PlanCache` keeps plans in one small JSON file keyed by what decides a plan
(:func:`plan_key`), so a validation callback, ``tarflow-sample``,
``tarflow-eval`` and ``tarflow-bench`` reuse one measurement.

Two kinds of key. With fixed weights (the CLIs) the key holds a fingerprint of the weights, so a
hit is the same model on the same device, batch and settings. During training the weights change
every round, so the key holds the architecture instead and the plan stores the CRM shares it was
made under; :func:`ranking_moved` says when the blocks' difficulty has moved enough to re-plan.

:class:`PlannerOptions` are the planner's knobs (the search itself: ``tarflow.sampling.planner``).

A plan also records its low-precision decision (:class:`PrecisionNote`): whether a bf16 network
was considered, the measured pass-time ratio, the measured error of its samples against the same
plan in full precision, and why it was kept or dropped.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tarflow.files import atomic_write
from tarflow.model import Guidance, TarFlow
from tarflow.sampling.knobs import knobs_of
from tarflow.sampling.schedule import (
    NET_DTYPES,
    SamplingSchedule,
    format_schedule,
    parse_schedule,
)

# 2: plans record their low-precision decision (PrecisionNote); a plan of version 1 was made
# under other net_dtype semantics (never bf16 by default) and is re-planned, never reused.
PLAN_VERSION = 2


@dataclass(frozen=True)
class PlannerOptions:
    """Knobs of :func:`plan_schedule` (defaults are what the sampler configs use).

    Attributes:
        rounds: probe rounds at most (round 0 times every candidate, later rounds the close
            calls; a third round runs only where two disagree on a block's fastest).
        margin: abandon a candidate once it has run this many times the best time so far.
        keep: re-time candidates within this factor of the best in later rounds.
        segments: GS segment counts tried (upwards) for tough blocks.
        tough_factor: the paper's rule: a block is tough when its CRM share is at least this
            times the uniform share 100/T.
        dtype_gain: a low-precision network is a candidate at a segment length only when one
            pass there takes at most this fraction of a full-precision pass.
        max_check_every: the largest convergence-test interval chosen.
    """

    rounds: int = 3
    margin: float = 1.25
    keep: float = 1.5
    segments: tuple[int, ...] = (2, 4, 8, 16)
    tough_factor: float = 1.5
    dtype_gain: float = 0.95
    max_check_every: int = 4

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.margin <= 1 or self.keep < 1:
            raise ValueError("planner needs rounds >= 1, margin > 1 and keep >= 1")


@dataclass
class Candidate:
    """One way to solve one block and what it cost on the probe batches.

    Attributes:
        label: the setting in the explicit schedule form (``seq``, ``S4/zeros/bf16``, ...).
        seconds: per timed round, the measured wall time; an abandoned run records the time at
            which it was stopped (a lower bound).
        aborted: how many of those runs were stopped for exceeding the budget.
        iters: network passes on the critical path in the last complete run (sequential: N - 1).
    """

    label: str
    seconds: list[float] = field(default_factory=list)
    aborted: int = 0
    iters: int = 0

    @property
    def complete(self) -> bool:
        return self.aborted == 0

    @property
    def cost(self) -> float:
        """Median seconds over the timed rounds: a one-off stall of the machine (they only ever
        make a run slower) moves a median of three runs not at all."""
        return statistics.median(self.seconds) if self.seconds else float("inf")

    def describe(self) -> str:
        ms = f"{self.cost * 1e3:.1f} ms"
        runs = f" (x{len(self.seconds)})" if len(self.seconds) > 1 else ""
        # A stopped sequential loop is extrapolated from its steps; anything else stopped is
        # known only to cost more than the time it was stopped at.
        mark = "" if self.complete else ("~" if self.label == "seq" else ">")
        return mark + ms + runs


@dataclass
class PrecisionNote:
    """Whether a plan considered a low-precision network, and why it was kept or dropped.

    Attributes:
        dtypes: the low network dtypes asked about (e.g. ["bfloat16"]); empty when none was.
        considered: whether the planner probed them (not when ``net_dtype`` forbids them or the
            model already runs in that dtype).
        gate: whether a low-precision choice must keep ``error <= bound`` (False when
            ``net_dtype`` forces the dtype: measured, not enforced).
        pass_ratio: per dtype, the seconds of one network pass in it over one in full
            precision: "long" (a Jacobi pass, N - 1 tokens) and "short" (a GS segment, N / 8).
        blocks: the blocks whose fastest candidate ran the low-precision network.
        error: the largest per-sample relative squared difference, mean((x - x_ref)^2) /
            mean(x_ref^2) (the planner's tolerance metric), between the samples of that plan
            and of the same plan in full precision, on the first probe noise; None when no
            block chose a low-precision network.
        full_error: the same measure between the full-precision plan's samples and the
            sequential loop's: how far the tolerance alone moves the samples.
        bound: the largest ``error`` kept, max(tol, full_error).
        tol: the plan's tolerance.
        kept: whether the final plan runs a low-precision network.
        reason: why it was kept or dropped, in words.
    """

    dtypes: list[str] = field(default_factory=list)
    considered: bool = False
    gate: bool = True
    pass_ratio: dict[str, dict[str, float]] = field(default_factory=dict)
    blocks: list[int] = field(default_factory=list)
    error: float | None = None
    full_error: float | None = None
    bound: float | None = None
    tol: float = 0.0
    kept: bool = False
    reason: str = ""

    def describe(self) -> str:
        """One line: "bf16: considered, kept in blocks 3, 1: ..." or why not."""
        names = "/".join(NET_DTYPES.get(d, d) for d in self.dtypes) or "low precision"
        if not self.considered:
            return f"{names}: not considered" + (f" ({self.reason})" if self.reason else "")
        ratios = "; ".join(f"{NET_DTYPES.get(d, d)} pass / full-precision pass: Jacobi "
                           f"{r.get('long', math.nan):.2f}x, GS {r.get('short', math.nan):.2f}x"
                           for d, r in self.pass_ratio.items())
        err = "" if self.error is None else (
            f"; sample error vs full precision {self.error:.1e}, bound {self.bound:.1e} = "
            f"max(tol {self.tol:.1e}, full precision vs sequential {self.full_error:.1e})")
        verdict = (f"kept in block(s) {', '.join(map(str, self.blocks))}" if self.kept
                   else "dropped")
        return f"{names}: considered, {verdict}: {self.reason} ({ratios}{err})"


@dataclass
class BlockPlan:
    """The planner's decision for one (forward) block and the candidates behind it."""

    block: int
    choice: str
    candidates: list[Candidate] = field(default_factory=list)

    def candidate(self, label: str) -> Candidate | None:
        return next((c for c in self.candidates if c.label == label), None)


@dataclass
class Plan:
    """A planned schedule with its evidence (see the module docstring).

    Attributes:
        schedule: the schedule to sample with.
        blocks: per forward block, the choice and its candidates.
        predicted_seconds: sum over blocks of the chosen candidates' median seconds.
        sequential_seconds: the same for the sequential loop (extrapolated from the steps it
            ran where it was stopped early: see ``sequential_complete``).
        planning_seconds: wall time spent planning (0 when loaded from a cache).
        key: what decided the plan (:func:`plan_key`).
        shares: CRM share per block (percent) of the ranking the plan was made under.
        source: "planned" or "cache".
        precision: the low-precision decision (:class:`PrecisionNote`).
        guess_seconds: the student's guess per call, included in ``predicted_seconds`` (0: no
            block starts from it).
        guess_timed: what that guess cost on the probes when a student was offered (None:
            none was), whether or not the plan kept it.
    """

    schedule: SamplingSchedule
    blocks: list[BlockPlan]
    predicted_seconds: float
    sequential_seconds: float
    sequential_complete: bool = True
    planning_seconds: float = 0.0
    key: dict[str, Any] = field(default_factory=dict)
    shares: dict[int, float] | None = None
    source: str = "planned"
    precision: PrecisionNote = field(default_factory=PrecisionNote)
    guess_seconds: float = 0.0
    guess_timed: float | None = None

    @property
    def predicted_speedup(self) -> float:
        return self.sequential_seconds / max(self.predicted_seconds, 1e-12)

    def summary(self) -> str:
        """One line: schedule, predicted time and speed-up, planning cost or cache."""
        bound = "" if self.sequential_complete else "~"
        calls = self.planning_seconds / max(self.predicted_seconds, 1e-12)
        how = ("reused from cache" if self.source == "cache"
               else f"planned in {self.planning_seconds:.2f} s = {calls:.1f} calls")
        guess = ("" if self.guess_timed is None else
                 f", student's guess {self.guess_timed * 1e3:.1f} ms: "
                 + ("included" if self.guess_seconds else "not worth it"))
        return (f"plan {format_schedule(self.schedule)}: predicted "
                f"{self.predicted_seconds * 1e3:.1f} ms per call, "
                f"{bound}{self.predicted_speedup:.2f}x sequential ({how}{guess})")

    def rows(self) -> tuple[list[str], list[list[Any]]]:
        """Table of the plan: one row per block and candidate (the ``sampling/plan`` table)."""
        columns = ["block", "candidate", "chosen", "median_ms", "complete", "iters", "rounds"]
        rows = [[bp.block, c.label, c.label == bp.choice, round(c.cost * 1e3, 3), c.complete,
                 c.iters, len(c.seconds)]
                for bp in sorted(self.blocks, key=lambda bp: -bp.block) for c in bp.candidates]
        return columns, rows

    def table(self) -> str:
        """Plain text: per block (sampling order) the choice and every candidate's cost."""
        lines = [self.summary(), self.precision.describe(),
                 f"{'block':>5}  {'choice':<16} candidates (median per call)"]
        for bp in sorted(self.blocks, key=lambda bp: -bp.block):
            cands = ", ".join(f"{c.label} {c.describe()}" for c in bp.candidates)
            lines.append(f"{bp.block:>5}  {bp.choice:<16} {cands}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"version": PLAN_VERSION, "schedule": format_schedule(self.schedule),
                "blocks": [asdict(bp) for bp in self.blocks],
                "predicted_seconds": self.predicted_seconds,
                "sequential_seconds": self.sequential_seconds,
                "sequential_complete": self.sequential_complete,
                "planning_seconds": self.planning_seconds, "key": self.key,
                "shares": None if self.shares is None else {str(b): v
                                                            for b, v in self.shares.items()},
                "precision": asdict(self.precision), "guess_seconds": self.guess_seconds,
                "guess_timed": self.guess_timed}

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "cache") -> Plan:
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {d.get('version')} is not {PLAN_VERSION}")
        blocks = [BlockPlan(b["block"], b["choice"], [Candidate(**c) for c in b["candidates"]])
                  for b in d["blocks"]]
        shares = d.get("shares")
        return cls(parse_schedule(d["schedule"]), blocks, float(d["predicted_seconds"]),
                   float(d["sequential_seconds"]), bool(d.get("sequential_complete", True)),
                   float(d.get("planning_seconds", 0.0)), dict(d.get("key") or {}),
                   None if shares is None else {int(b): float(v) for b, v in shares.items()},
                   source, PrecisionNote(**d["precision"]),
                   float(d.get("guess_seconds") or 0.0), d.get("guess_timed"))


# ------------------------------------------------------------------------------- keys
def device_name(device: torch.device | str) -> str:
    """What decides speed on a device: the GPU's name, or the CPU and its thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{torch.cuda.get_device_name(index)}"
    cpu = platform.processor() or platform.machine()
    try:  # platform.processor() is often empty on Linux; the model name is in /proc/cpuinfo
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{device.type}:{cpu}, {torch.get_num_threads()} threads"


def fingerprint(model: TarFlow) -> str:
    """A short hash of the weights: every tensor's name, shape, dtype and a strided sample of up to
    4096 of its values (hashing every byte of a billion-parameter model would cost seconds)."""
    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def plan_key(model: TarFlow, *, batch_size: int, tol: float, guidance: Guidance,
             net_dtypes: tuple[str, ...] = (), precision_gate: bool = True,
             weights: bool = True, options: PlannerOptions = PlannerOptions(),
             student: torch.nn.Module | None = None,
             student_steps: int | None = None) -> dict[str, Any]:
    """What decides a plan: the one place a plan-cache key is built (every command and the
    validation callback reach it through ``SamplerSettings.plan_key``).

    ``weights=False`` keys on the architecture only (training, where a plan is reused until
    :func:`ranking_moved` says otherwise). ``net_dtypes`` and ``precision_gate`` are
    :func:`plan_schedule`'s: the same dtypes with and without the accuracy check may choose
    differently. Guidance enters by every knob (``tarflow.sampling.knobs``) and the planner's
    options by every field, defaults included, so that settings which plan alike key alike
    however they were written. A student offered to the planner enters by its weights and
    steps (absent without one, so plans made without a student keep their keys)."""
    param = next(model.parameters())
    cfg = model.config
    extra = {} if student is None else {"student": {"weights": fingerprint(student),
                                                    "steps": student_steps}}
    return {**extra, "model": f"weights:{fingerprint(model)}" if weights
            else f"config:{cfg.tag}",
            "img": [cfg.img_size, cfg.in_channels, cfg.num_classes],
            "device": device_name(param.device), "batch": int(batch_size),
            "dtype": str(param.dtype).removeprefix("torch."),
            "net_dtypes": sorted(net_dtypes), "precision_gate": bool(precision_gate),
            "tol": float(tol), "version": PLAN_VERSION,
            "guidance": knobs_of(guidance),
            "planner": {k: list(v) if isinstance(v, tuple) else v
                        for k, v in sorted(asdict(options).items())},
            "torch": torch.__version__}


def ranking_moved(then: dict[int, float] | None, now: dict[int, float] | None, *,
                  threshold: float = 10.0, tough_factor: float = 1.5) -> bool:
    """Whether the CRM shares moved enough to re-plan: any block's share by more than
    ``threshold`` percentage points, or the set of tough blocks (share >= tough_factor x the
    uniform share, the paper's rule) changed. Shares early in training drift by a few points
    per round; a new tough block changes which blocks need segments at all."""
    if then is None or now is None:
        return False
    if set(then) != set(now):
        return True
    uniform = 100.0 / max(len(now), 1)

    def tough(shares: dict[int, float]) -> set[int]:
        return {b for b, s in shares.items() if s >= tough_factor * uniform}

    return (max(abs(then[b] - now[b]) for b in now) > threshold) or tough(then) != tough(now)


class PlanCache:
    """Plans in one JSON file, keyed by :func:`plan_key`; written atomically (temp + rename).

    ``path=None`` keeps the plans in memory only (one process, e.g. a notebook or a test).
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = None if path is None else Path(path)
        self._memory: dict[str, Any] = {}

    @staticmethod
    def _text(key: dict[str, Any]) -> str:
        return json.dumps(key, sort_keys=True)

    def _load(self) -> dict[str, Any]:
        if self.path is None:
            return self._memory
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, json.JSONDecodeError):
            return {}  # an unreadable cache is a miss, never an error: plans can be remade
        return data.get("plans", {}) if isinstance(data, dict) else {}

    def get(self, key: dict[str, Any]) -> Plan | None:
        raw = self._load().get(self._text(key))
        if raw is None:
            return None
        try:
            return Plan.from_dict(raw, source="cache")
        except (KeyError, TypeError, ValueError):
            return None  # an older or damaged entry: re-plan

    def put(self, plan: Plan) -> None:
        plans = self._load()
        plans[self._text(plan.key)] = plan.to_dict()
        self._write(plans)

    def drop(self, key: dict[str, Any]) -> None:
        """Forget the plan of ``key`` (one measured to be wrong), if there is one."""
        plans = self._load()
        if plans.pop(self._text(key), None) is not None:
            self._write(plans)

    def _write(self, plans: dict[str, Any]) -> None:
        if self.path is None:
            self._memory = plans
            return
        atomic_write(self.path, json.dumps({"version": PLAN_VERSION, "plans": plans}, indent=1))
