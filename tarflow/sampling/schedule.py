"""Sampling schedules as data: per-block GS-Jacobi settings keyed by *forward* block id.

Block 0 is the block that produces the image; block T-1 is the first one sampled. A schedule never
stores parallel lists indexed by loop position, so "block 7" means the same thing everywhere.

Paper notation ``[Stack-GS-J-Else]`` (GS-Jacobi paper, Liu & Qin 2025):
    ``[7-8-32-10]``          block 7: 8 segments x at most 32 iterations; other blocks Jacobi x 10.
    ``[0/6-8-32-20]``        blocks 0 and 6 both 8 x 32; others Jacobi x 20.
    ``[0/7-256/8-1/13-6]``   block 0: 256 segments x 1 (sequential at N = 256); block 7: 8 x 13;
                             others Jacobi x 6.
A field may hold one value per stacked block ("/"-separated) or one value for all of them.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace

INITS = ("z", "zeros")
# segments = SEQUENTIAL means one segment per token: the sequential loop.
SEQUENTIAL = -1


@dataclass(frozen=True)
class BlockSchedule:
    """How to solve one block.

    Attributes:
        segments: S, contiguous segments solved in order (1 = Jacobi, SEQUENTIAL or >= N = the
            sequential loop).
        max_iters: cap on Jacobi iterations per segment; None = the segment length, which is
            always exact (the triangular system is solved after that many iterations).
        init: initial guess, "z" (the block's sampling input) or "zeros" ([z_0, 0, ..., 0]).
        tol: stop a sample once its relative residual mean((X' - X)^2) / mean(X'^2), computed in
            float32 over the segment, is <= tol. 0 stops only at an exact fixed point.
        freeze: stop feeding the leading positions whose change is already within ``tol`` for
            every active sample (their cached K/V are kept). Exact at tol = 0; saves compute
            where Jacobi converges front to back.
    """

    segments: int = 1
    max_iters: int | None = None
    init: str = "z"
    tol: float = 0.0
    freeze: bool = True

    def __post_init__(self) -> None:
        if self.segments != SEQUENTIAL and self.segments < 1:
            raise ValueError(f"segments={self.segments} must be >= 1 (or -1 for sequential)")
        if self.max_iters is not None and self.max_iters < 1:
            raise ValueError(f"max_iters={self.max_iters} must be >= 1 (or None = exact)")
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r} must be one of {INITS}")
        if not self.tol >= 0:  # also rejects NaN
            raise ValueError(f"tol={self.tol} must be >= 0")

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

    def with_tol(self, tol: float) -> SamplingSchedule:
        return replace(self, blocks={b: replace(s, tol=tol) for b, s in self.blocks.items()},
                       default=replace(self.default, tol=tol))

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


def parse_schedule(text: str, *, init: str = "z", tol: float = 0.0) -> SamplingSchedule:
    """Parse "sequential", "jacobi", "jacobi:J" or the paper's ``[Stack-GS-J-Else]`` notation.

    ``init`` and ``tol`` apply to every block (the notation does not carry them).
    """
    text = text.strip()
    low = text.lower()
    if low == "sequential":
        return SamplingSchedule.sequential()
    if low == "jacobi" or low.startswith("jacobi:"):
        iters = int(low.split(":", 1)[1]) if ":" in low else None
        return SamplingSchedule.jacobi(iters, init=init, tol=tol)
    m = _NOTATION.match(text)
    if not m:
        raise ValueError(f"cannot parse schedule {text!r}: expected 'sequential', 'jacobi[:J]' "
                         f"or the paper's notation such as '[7-8-32-10]' or '[0/7-256/8-1/13-6]'")
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


def format_schedule(schedule: SamplingSchedule) -> str:
    """The paper's notation when the schedule fits it, else a compact explicit form."""
    d = schedule.default
    fits = (d.segments == 1 and d.max_iters is not None and schedule.blocks
            and all(s.max_iters is not None and s.segments != SEQUENTIAL
                    for s in schedule.blocks.values()))
    if fits:
        ids = sorted(schedule.blocks)
        gs = [schedule.blocks[b].segments for b in ids]
        its = [schedule.blocks[b].max_iters for b in ids]

        def join(v: list[int]) -> str:
            return str(v[0]) if len(set(v)) == 1 else "/".join(map(str, v))

        return f"[{'/'.join(map(str, ids))}-{join(gs)}-{join(its)}-{d.max_iters}]"
    parts = [f"{b}:{_short(s)}" for b, s in sorted(schedule.blocks.items()) if s != d]
    parts.append(f"else:{_short(d)}")
    tols = {s.tol for s in [d, *schedule.blocks.values()]}
    tail = f" tol={tols.pop():g}" if len(tols) == 1 else ""
    return "{" + ", ".join(parts) + "}" + tail


def _short(s: BlockSchedule) -> str:
    seg = "seq" if s.segments == SEQUENTIAL else f"S{s.segments}"
    its = "" if s.max_iters is None else f"xJ{s.max_iters}"
    return f"{seg}{its}" + (f"/{s.init}" if s.init != "z" else "")


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
