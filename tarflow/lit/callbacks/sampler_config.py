"""Sampler settings from a plain dict: a ``conf/sampler/*.yaml`` after ``OmegaConf.to_container``.

The same sampler files drive validation sampling, ``tarflow-sample``, ``tarflow-eval`` and the
benchmarks, so the translation into ring-1 objects lives in one place. This module imports neither
Hydra nor OmegaConf: callers convert their config to plain containers first.

A sampler dict has the keys ``name, schedule, tol, init, guidance, attn_temp, annealed, denoise,
check_every, auto``; ``schedule`` is "sequential", "jacobi[:J]", the paper's "[Stack-GS-J-Else]"
notation, an explicit per-block dict, or "auto" (chosen from a CRM/IGM ranking at run time).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tarflow.lit.callbacks.sample_set import fixed_inputs
from tarflow.model import TarFlow
from tarflow.sampling import BlockRank, SamplingSchedule, build_schedule, schedule_from_ranking
from tarflow.sampling.precision import parse_dtype
from tarflow.sampling.tune import tune_segments

AUTO = "auto"
# Keys of the `auto` sub-dict, i.e. keyword arguments of schedule_from_ranking besides tol.
AUTO_KEYS = ("tough_factor", "tough_segments", "sequential_share", "tough_iters", "else_iters")
KNOB_KEYS = ("guidance", "attn_temp", "annealed", "denoise", "check_every", "net_dtype")
KNOWN_KEYS = frozenset(("name", "schedule", "tol", "init", "auto", "tune_segments", *KNOB_KEYS))


@dataclass(frozen=True)
class SamplerSettings:
    """A parsed sampler config.

    Attributes:
        name: display name (the config file's stem).
        schedule: a ready :class:`SamplingSchedule`, or ``"auto"`` when it must come from a
            ranking (see :meth:`resolve`).
        knobs: keyword arguments for :func:`tarflow.sampling.sample` (guidance, attn_temp,
            annealed, denoise, check_every, net_dtype).
        tol: Jacobi stopping tolerance (also used by the automatic schedule).
        init: default initial guess.
        auto: keyword arguments for :func:`schedule_from_ranking` (besides ``tol``).
        tune_segments: time 1/2/4/8 segments for the schedule's segmented (tough) blocks at the
            sampling batch size and keep the fastest (:meth:`tune`); off by default.
    """

    name: str
    schedule: SamplingSchedule | str
    knobs: dict[str, Any] = field(default_factory=dict)
    tol: float = 0.0
    init: str = "z"
    auto: dict[str, Any] = field(default_factory=dict)
    tune_segments: bool = False

    @property
    def is_auto(self) -> bool:
        return isinstance(self.schedule, str) and self.schedule == AUTO

    def resolve(self, ranking: list[BlockRank] | None, num_patches: int) -> SamplingSchedule:
        """The schedule to sample with: the configured one, or the one a ranking implies.

        Args:
            ranking: output of ``rank_blocks``; required when the schedule is "auto".
            num_patches: N, the model's sequence length (caps the segment count).

        Raises:
            ValueError: "auto" without a ranking.
        """
        if not self.is_auto:
            return self.schedule
        if ranking is None:
            raise ValueError(f"sampler {self.name!r} uses schedule 'auto', which needs a CRM/IGM "
                             f"ranking of the model's blocks on real images")
        return schedule_from_ranking(ranking, num_patches, tol=self.tol, **self.auto)

    def tune(self, net: TarFlow, schedule: SamplingSchedule, batch_size: int, *, seed: int = 0
             ) -> tuple[SamplingSchedule, dict[int, float]]:
        """``schedule`` with its tough blocks' segment count timed on this device at this batch
        size (see ``tarflow.sampling.tune``), when ``tune_segments`` is on; else unchanged."""
        if not self.tune_segments:
            return schedule, {}
        noise, y = fixed_inputs(net, range(max(1, batch_size)), seed)
        return tune_segments(net, schedule, noise, y, **self.knobs)

    def sequential_twin(self) -> SamplerSettings:
        """The same knobs with the exact sequential schedule (the reference for speed-ups)."""
        return SamplerSettings(f"{self.name}-sequential", SamplingSchedule.sequential(),
                               dict(self.knobs), self.tol, self.init, dict(self.auto))


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
    unknown = sorted(set(cfg) - KNOWN_KEYS)
    if unknown:
        raise ValueError(f"unknown sampler option(s) {unknown}; known: {sorted(KNOWN_KEYS)}")
    auto_cfg = dict(cfg.get("auto") or {})
    bad_auto = sorted(set(auto_cfg) - set(AUTO_KEYS))
    if bad_auto:
        raise ValueError(f"unknown sampler.auto option(s) {bad_auto}; known: {list(AUTO_KEYS)}")
    tol = float(cfg.get("tol") or 0.0)
    init = str(cfg.get("init") or "z")
    spec = cfg.get("schedule", "sequential")
    if isinstance(spec, str) and spec.strip().lower() == AUTO:
        schedule: SamplingSchedule | str = AUTO
    else:
        schedule = build_schedule(spec, init=init, tol=tol)
    knobs = {
        "guidance": float(cfg.get("guidance") or 0.0),
        "attn_temp": float(cfg.get("attn_temp", 1.0) or 1.0),
        "annealed": bool(cfg.get("annealed", False)),
        "denoise": float(cfg.get("denoise") or 0.0),
        "check_every": int(cfg.get("check_every") or 1),
        "net_dtype": _dtype_name(cfg.get("net_dtype")),
    }
    name = str(cfg.get("name") or (spec if isinstance(spec, str) else "custom"))
    return SamplerSettings(name, schedule, knobs, tol, init, auto_cfg,
                           bool(cfg.get("tune_segments", False)))


def _dtype_name(value: Any) -> str | None:
    """Validate ``net_dtype`` now (a typo fails at start-up, not at the first validation) and
    keep it as a plain string so the knobs stay YAML/JSON-serialisable."""
    dtype = parse_dtype(value)
    return None if dtype is None else str(dtype).removeprefix("torch.")
