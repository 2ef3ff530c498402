"""The sampler's settable knobs by name: the one list that sampler configs
(:mod:`tarflow.sampling.settings`), plan keys (:func:`tarflow.sampling.plan.plan_key`), the
benchmark and the commands' output read.

``GUIDANCE_KNOBS`` are the keyword arguments of :func:`tarflow.sampling.sample` that make up a
:class:`~tarflow.model.Guidance` (in its field order); ``KNOBS`` adds self-denoising, which acts
after the blocks are solved. A new knob is one entry here (with its default) plus its keyword in
``sample``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tarflow.model import Guidance

# knob name -> default, in Guidance's field order (scale, attn_temp, annealed, rule).
GUIDANCE_DEFAULTS: dict[str, Any] = {"guidance": 0.0, "attn_temp": 1.0, "annealed": False,
                                     "guidance_rule": "linear"}
GUIDANCE_KNOBS = tuple(GUIDANCE_DEFAULTS)
DEFAULTS: dict[str, Any] = {**GUIDANCE_DEFAULTS, "denoise": 0.0}
KNOBS = tuple(DEFAULTS)


def parse_knobs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Every knob from a config mapping, typed as its default; missing, null (or 0 / "") take the
    default."""
    return {k: type(d)(cfg.get(k) or d) for k, d in DEFAULTS.items()}


def guidance_of(knobs: Mapping[str, Any]) -> Guidance:
    """The :class:`Guidance` that the guidance knobs of ``knobs`` describe."""
    return Guidance(*(knobs.get(k, d) for k, d in GUIDANCE_DEFAULTS.items()))


def knobs_of(guidance: Guidance) -> dict[str, Any]:
    """The guidance knobs (``sample``'s keywords) of a :class:`Guidance`, typed as their
    defaults (so that guidance 1 and 1.0 read alike in a plan key)."""
    values = (guidance.scale, guidance.attn_temp, guidance.annealed, guidance.rule)
    return {k: type(d)(v) for (k, d), v in zip(GUIDANCE_DEFAULTS.items(), values, strict=True)}
