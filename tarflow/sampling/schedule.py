"""Sampling schedules as data: per-block GS-Jacobi settings keyed by *forward* block id.

Block 0 is the block that produces the image; block T-1 is the first one sampled. A schedule never
stores parallel lists indexed by loop position, so "block 7" means the same thing everywhere.

Two text forms, both printed by :func:`format_schedule` and read back by :func:`parse_schedule`.

Paper notation ``[Stack-GS-J-Else]`` (GS-Jacobi paper, Liu & Qin 2025):
    ``[7-8-32-10]``          block 7: 8 segments x at most 32 iterations; other blocks Jacobi x 10.
    ``[0/6-8-32-20]``        blocks 0 and 6 both 8 x 32; others Jacobi x 20.
    ``[0/7-256/8-1/13-6]``   block 0: 256 segments x 1 (sequential at N = 256); block 7: 8 x 13;
                             others Jacobi x 6.
A field may hold one value per stacked block ("/"-separated) or one value for all of them.

Explicit form, for what the notation cannot say (the planner's schedules, per-block options):
    ``{0:S1/zeros, 3:S4xJ16/bf16/c2, else:seq} tol=0.003``
one ``block:setting`` per listed block plus ``else``; a setting is ``seq`` or ``S<segments>``
with an optional ``xJ<max_iters>``, then "/"-separated options that differ from the defaults:
``zeros`` / ``student`` (initial guess), ``c<k>`` (convergence test every k iterations), a
network dtype (``bf16``, ``fp16``, ``fp32``, ``fp64``), ``t<tol>`` (when blocks differ in tol),
``nofreeze``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace

from tarflow.sampling.fixed_point import INITS

# segments = SEQUENTIAL means one segment per token: the sequential loop.
SEQUENTIAL = -1
# Network dtypes a block may run its Jacobi passes in, by canonical name and short alias.
NET_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}


@dataclass(frozen=True)
class BlockSchedule:
    """How to solve one block.

    Attributes:
        segments: S, contiguous segments solved in order (1 = Jacobi, SEQUENTIAL or >= N = the
            sequential loop).
        max_iters: cap on Jacobi iterations per segment; None = the segment length, which is
            always exact (the triangular system is solved after that many iterations).
        init: initial guess, "z" (the block's sampling input), "zeros" ([z_0, 0, ..., 0]) or
            "student" (a distilled student's sample pushed through the teacher's forward pass
            to this block's input: ``sample(..., student=...)``; the fixed point, hence the
            sample, is the same whatever the guess).
        tol: stop a sample once its relative residual mean((X' - X)^2) / mean(X'^2), computed in
            float32 over the segment, is <= tol. 0 stops only at an exact fixed point.
        freeze: feed only the unfinished part of a segment: positions behind the exact frontier
            (one more per iteration) and leading positions whose change is within ``tol`` for
            every active sample stop being fed; their cached K/V are kept. Exact at tol = 0;
            saves compute where a pass costs in proportion to its tokens. False feeds the whole
            segment every iteration; a single-segment block then needs no K/V cache at all
            (full causal passes, as the reference loop), cheaper where a pass costs about the
            same whatever its length (small batches).
        check_every: test convergence (residual, freezing, early exit) every k-th iteration and
            on the segment's last one. A test costs a host sync and a few small kernels; where
            a network pass is cheap, testing less often pays (the planner decides).
        net_dtype: run this block's Jacobi network passes in this dtype ("bfloat16", ...) while
            iterates, update and stopping test keep the noise dtype; None = the noise dtype.
            Sequential blocks always run in full precision.
    """

    segments: int = 1
    max_iters: int | None = None
    init: str = "z"
    tol: float = 0.0
    freeze: bool = True
    check_every: int = 1
    net_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.segments != SEQUENTIAL and self.segments < 1:
            raise ValueError(f"segments={self.segments} must be >= 1 (or -1 for sequential)")
        if self.max_iters is not None and self.max_iters < 1:
            raise ValueError(f"max_iters={self.max_iters} must be >= 1 (or None = exact)")
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r} must be one of {INITS}")
        if not self.tol >= 0:  # also rejects NaN
            raise ValueError(f"tol={self.tol} must be >= 0")
        if self.check_every < 1:
            raise ValueError(f"check_every={self.check_every} must be >= 1")
        if self.net_dtype is not None and self.net_dtype not in NET_DTYPES:
            raise ValueError(f"net_dtype={self.net_dtype!r} must be one of {sorted(NET_DTYPES)} "
                             f"or None")

    def is_sequential(self, num_patches: int) -> bool:
        return self.segments == SEQUENTIAL or self.segments >= num_patches

    def boundaries(self, num_patches: int) -> list[int]:
        """Segment edges over positions [0, N): S + 1 increasing ints, sizes differing by <= 1."""
        S = num_patches if self.is_sequential(num_patches) else self.segments
        return [(k * num_patches) // S for k in range(S + 1)]


@dataclass(frozen=True)
class SamplingSchedule:
    """Per-block settings: ``blocks[b]`` for listed forward block ids, ``default`` for the rest."""

    blocks: dict[int, BlockSchedule] = field(default_factory=dict)
    default: BlockSchedule = BlockSchedule()
    name: str = ""

    def for_block(self, block: int) -> BlockSchedule:
        return self.blocks.get(block, self.default)

    def validate(self, num_blocks: int, num_patches: int) -> SamplingSchedule:
        """Raise a clear ValueError if the schedule does not fit the model; return self."""
        bad = sorted(b for b in self.blocks if not 0 <= b < num_blocks)
        if bad:
            raise ValueError(f"schedule {self.describe()} names block(s) {bad}, but the model "
                             f"has blocks 0..{num_blocks - 1}")
        for b in range(num_blocks):
            s = self.for_block(b)
            if s.segments != SEQUENTIAL and s.segments > num_patches:
                raise ValueError(f"schedule {self.describe()}: block {b} asks for {s.segments} "
                                 f"segments but the sequence has only N={num_patches} tokens")
        return self

    def with_settings(self, **changes) -> SamplingSchedule:
        """The same schedule with ``changes`` (BlockSchedule fields) applied to every block.

        A name survives only a change of ``tol``, which names never carry.
        """
        blocks = {b: replace(s, **changes) for b, s in self.blocks.items()}
        keep = set(changes) <= {"tol"}
        return replace(self, blocks=blocks, default=replace(self.default, **changes),
                       name=self.name if keep else "")

    def with_tol(self, tol: float) -> SamplingSchedule:
        return self.with_settings(tol=tol)

    # -------------------------------------------------------------------- named schedules
    @classmethod
    def sequential(cls) -> SamplingSchedule:
        return cls(default=BlockSchedule(segments=SEQUENTIAL), name="sequential")

    @classmethod
    def jacobi(cls, max_iters: int | None = None, *, init: str = "z",
               tol: float = 0.0) -> SamplingSchedule:
        name = "jacobi" if max_iters is None else f"jacobi:{max_iters}"
        return cls(default=BlockSchedule(1, max_iters, init, tol), name=name)

    # -------------------------------------------------------------------- text forms
    def describe(self) -> str:
        return self.name or format_schedule(self)

    def to_dict(self) -> dict:
        """Plain dict for YAML/JSON: {"default": {...}, "blocks": {b: {...}}}."""
        return {"default": asdict(self.default),
                "blocks": {int(b): asdict(s) for b, s in sorted(self.blocks.items())}}

    @classmethod
    def from_dict(cls, d: dict, *, name: str = "") -> SamplingSchedule:
        """Explicit per-block settings; block keys may be ints or digit strings."""
        default = BlockSchedule(**(d.get("default") or {}))
        blocks = {}
        for key, settings in (d.get("blocks") or {}).items():
            if not str(key).lstrip("-").isdigit():
                raise ValueError(f"schedule block key {key!r} is not a block number")
            blocks[int(key)] = replace(default, **settings)
        return cls(blocks, default, name)


_NOTATION = re.compile(r"^\[?\s*([\d/]+)-([\d/]+)-([\d/]+)-(\d+)\s*\]?$")
_EXPLICIT = re.compile(r"^\{(?P<body>[^{}]*)\}\s*(?:tol\s*=\s*(?P<tol>\S+))?$")
_SETTING = re.compile(r"^(?:(?P<seq>seq)|S(?P<segments>\d+)(?:xJ(?P<iters>\d+))?)$")
_DTYPE_NAMES = {**{short: name for name, short in NET_DTYPES.items()},
                **{name: name for name in NET_DTYPES}}


def parse_schedule(text: str, *, init: str = "z", tol: float = 0.0) -> SamplingSchedule:
    """Parse "sequential", "jacobi", "jacobi:J", the paper's ``[Stack-GS-J-Else]`` notation or
    the explicit ``{block:setting, ..., else:setting} tol=...`` form (see the module docstring).

    ``init`` and ``tol`` apply to every block where the text does not say otherwise.
    """
    text = text.strip()
    low = text.lower()
    if low == "sequential":
        return SamplingSchedule.sequential()
    if low == "jacobi" or low.startswith("jacobi:"):
        iters = int(low.split(":", 1)[1]) if ":" in low else None
        return SamplingSchedule.jacobi(iters, init=init, tol=tol)
    if text.startswith("{"):
        return _parse_explicit(text, init=init, tol=tol)
    m = _NOTATION.match(text)
    if not m:
        raise ValueError(f"cannot parse schedule {text!r}: expected 'sequential', 'jacobi[:J]', "
                         f"the paper's notation such as '[7-8-32-10]' or '[0/7-256/8-1/13-6]', "
                         f"or the explicit form such as '{{3:S8/zeros, else:S1}} tol=0.001'")
    stack = [int(v) for v in m.group(1).split("/")]
    gs = [int(v) for v in m.group(2).split("/")]
    its = [int(v) for v in m.group(3).split("/")]
    for label, values in (("GS", gs), ("J", its)):
        if len(values) not in (1, len(stack)):
            raise ValueError(f"schedule {text!r}: {label} has {len(values)} values for "
                             f"{len(stack)} stacked blocks")
    if len(set(stack)) != len(stack):
        raise ValueError(f"schedule {text!r} lists a block twice")
    default = BlockSchedule(1, int(m.group(4)), init, tol)
    blocks = {b: BlockSchedule(gs[i if len(gs) > 1 else 0], its[i if len(its) > 1 else 0],
                               init, tol)
              for i, b in enumerate(stack)}
    return SamplingSchedule(blocks, default, name="")


def _parse_explicit(text: str, *, init: str, tol: float) -> SamplingSchedule:
    m = _EXPLICIT.match(text)
    if not m:
        raise ValueError(f"cannot parse schedule {text!r}: the explicit form is "
                         f"'{{block:setting, ..., else:setting}} tol=<float>'")
    if m.group("tol") is not None:
        try:
            tol = float(m.group("tol"))
        except ValueError:
            raise ValueError(f"schedule {text!r}: tol={m.group('tol')!r} is not a number") from None
    settings: dict[str, BlockSchedule] = {}
    for part in filter(None, (p.strip() for p in m.group("body").split(","))):
        key, sep, value = part.partition(":")
        key = key.strip()
        if not sep or not (key == "else" or key.isdigit()):
            raise ValueError(f"schedule {text!r}: {part!r} is not 'block:setting' or "
                             f"'else:setting'")
        if key in settings:
            raise ValueError(f"schedule {text!r} lists {key} twice")
        settings[key] = _parse_setting(value.strip(), init=init, tol=tol, text=text)
    default = settings.pop("else", BlockSchedule(1, None, init, tol))
    return SamplingSchedule({int(b): s for b, s in settings.items()}, default, name="")


def _parse_setting(value: str, *, init: str, tol: float, text: str) -> BlockSchedule:
    head, *options = value.split("/")
    m = _SETTING.match(head)
    if not m:
        raise ValueError(f"schedule {text!r}: {head!r} is not 'seq' or 'S<segments>[xJ<iters>]'")
    fields: dict = {"segments": SEQUENTIAL if m.group("seq") else int(m.group("segments")),
                    "max_iters": None if m.group("iters") is None else int(m.group("iters")),
                    "init": init, "tol": tol}
    for opt in options:
        if opt in INITS:
            fields["init"] = opt
        elif opt in _DTYPE_NAMES:
            fields["net_dtype"] = _DTYPE_NAMES[opt]
        elif opt == "nofreeze":
            fields["freeze"] = False
        elif re.fullmatch(r"c\d+", opt):
            fields["check_every"] = int(opt[1:])
        elif re.fullmatch(r"t[-+.\deE]+", opt):
            fields["tol"] = float(opt[1:])
        else:
            raise ValueError(f"schedule {text!r}: unknown option {opt!r} (known: z, zeros, "
                             f"c<k>, {', '.join(NET_DTYPES.values())}, t<tol>, nofreeze)")
    return BlockSchedule(**fields)


def format_schedule(schedule: SamplingSchedule) -> str:
    """The paper's notation when the schedule fits it, else a compact explicit form."""
    d = schedule.default
    every = [d, *schedule.blocks.values()]
    fits = (d.segments == 1 and d.max_iters is not None and schedule.blocks
            and all(s.max_iters is not None and s.segments != SEQUENTIAL
                    for s in schedule.blocks.values())
            and all((s.check_every, s.net_dtype, s.freeze) == (1, None, True) for s in every)
            and len({(s.init, s.tol) for s in every}) == 1)
    if fits:
        ids = sorted(schedule.blocks)
        gs = [schedule.blocks[b].segments for b in ids]
        its = [schedule.blocks[b].max_iters for b in ids]

        def join(v: list[int]) -> str:
            return str(v[0]) if len(set(v)) == 1 else "/".join(map(str, v))

        return f"[{'/'.join(map(str, ids))}-{join(gs)}-{join(its)}-{d.max_iters}]"
    tols = {s.tol for s in every}
    uniform = tols.pop() if len(tols) == 1 else None
    parts = [f"{b}:{format_block(s, uniform)}"
             for b, s in sorted(schedule.blocks.items()) if s != d]
    parts.append(f"else:{format_block(d, uniform)}")
    tail = "" if uniform is None else f" tol={uniform!r}"
    return "{" + ", ".join(parts) + "}" + tail


def format_block(s: BlockSchedule, uniform_tol: float | None) -> str:
    """One block's setting in the explicit form (``S4/zeros/bf16``, ``seq``); options only
    where they differ from the defaults (and the tol only when it is not ``uniform_tol``), so
    ``_parse_setting`` reads it back to the same BlockSchedule."""
    text = "seq" if s.segments == SEQUENTIAL else f"S{s.segments}"
    text += "" if s.max_iters is None else f"xJ{s.max_iters}"
    options = [s.init] if s.init != "z" else []
    options += [f"c{s.check_every}"] if s.check_every != 1 else []
    options += [NET_DTYPES[s.net_dtype]] if s.net_dtype else []
    options += [f"t{s.tol!r}"] if uniform_tol is None else []
    options += ["nofreeze"] if not s.freeze else []
    return "/".join([text, *options])


def build_schedule(spec: str | dict | SamplingSchedule | None, *, init: str = "z",
                   tol: float = 0.0) -> SamplingSchedule:
    """A schedule from a config value: None/"sequential", "jacobi[:J]", paper notation, a dict of
    explicit per-block settings ({"default": {...}, "blocks": {b: {...}}}) or a schedule.

    "auto" is not handled here: it needs a ranking (see ``schedule_from_ranking``).
    """
    if spec is None:
        return SamplingSchedule.sequential()
    if isinstance(spec, SamplingSchedule):
        return spec
    if isinstance(spec, dict):
        d = dict(spec)
        d["default"] = {"init": init, "tol": tol, **(d.get("default") or {})}
        return SamplingSchedule.from_dict(d)
    if str(spec).strip().lower() == "auto":
        raise ValueError("schedule 'auto' needs a CRM/IGM ranking: use schedule_from_ranking")
    return parse_schedule(str(spec), init=init, tol=tol)
