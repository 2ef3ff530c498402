"""Named training-loss terms that make GS-Jacobi sampling converge in fewer iterations.

Sampling block b solves, in the block's token order, the fixed point x = F(x) of
    F(x) = b(x) + sigma(a(x)) * z        (z: the block's output, held fixed)
by Jacobi iterations X <- F(X) (ALGORITHMS.md §4). Near the solution the error obeys
e_{k+1} ~= J_F e_k, so after k iterations it is ~= J_F^k e_0. J_F is strictly block lower-triangular
(position i depends on positions < i only), hence nilpotent: the error dies after N - 1 iterations
whatever happens, and what decides how many a block needs at a tolerance is how fast the chains
J_F^k decay. Three formulations, each a function of the training input x and output z of a block:

``jacobian``   ||u^T J_F||^2 / d, one Hutchinson estimate of ||J_F||_F^2 / d (u ~ N(0, I)):
               penalises every one-step dependence (DEQ Jacobian regularisation, 2106.14342).
``chain``      ||u^T J_F^k||^2 / d: only dependence that survives k iterations is penalised, so a
               strong one-step dependence that decays is free (k = the iteration budget aimed for).
``trajectory`` run k Jacobi iterations from the sampler's initial guess without gradient, then one
               more with it, and penalise ||F(X^(k)) - x||^2 / ||x||^2 (in the spirit of consistency
               LLMs, 2403.00835): the distance of iterate k + 1 from the fixed point, in the same
               relative squared norm as the sampler's stopping test.

All are zero for a zero-initialised block (F(x) = z does not depend on x, and one iteration lands on
the solution), d = N * D. The Jacobian terms need a double backward: their forward runs under
PyTorch's math attention kernel, since the CPU flash kernel has no double backward.

A term is configured by a plain mapping (see :func:`parse_speed_terms`) and applied to chosen
blocks, every k-th step or with probability p; several blocks are combined by ``balance``:
``sum`` (every block alike), ``share`` (each block weighted by its detached share of the total, so
the block that dominates is pushed hardest and none can take over) or ``max``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from tarflow.model.config import TarFlowConfig
from tarflow.model.flow import FlowBlock
from tarflow.model.permutation import permute
from tarflow.sampling.fixed_point import INPUT_INITS, fixed_point_map, initial_guess
from tarflow.sampling.ranking import rank_blocks

KINDS = ("jacobian", "chain", "trajectory")
BALANCES = ("sum", "share", "max")


# ------------------------------------------------------------------------------ the maths
# F and the initial guesses are the sampler's own (tarflow.sampling.fixed_point).
def chain_penalty(block: FlowBlock, xp: torch.Tensor, zp: torch.Tensor, u: torch.Tensor, *,
                  k: int = 1, cond: torch.Tensor | float = 0.0) -> torch.Tensor:
    """||u^T J_F^k||^2 / (B * N * D) at the fixed point x, differentiable in the parameters.

    E_u of it is ||J_F^k||_F^2 / d per sample. k vector-Jacobian products of one graph, each kept
    differentiable (create_graph), so the penalty's gradient is a double backward.

    Args:
        xp: (B, N, D) the block's training input, permuted frame (detached here).
        zp: (B, N, D) its output (detached: the fixed point is held, only the map moves).
        u: (B, N, D) probe vectors.
        k: power of the Jacobian (1 = the plain Jacobian penalty).
    """
    with sdpa_kernel(SDPBackend.MATH), torch.enable_grad():
        x = xp.detach().requires_grad_(True)
        fx = fixed_point_map(block, x, zp.detach(), cond=cond)  # (B, N, D)
        v = u.to(fx.dtype)
        for _ in range(k):  # v <- v^T J_F, row vector times Jacobian
            (v,) = torch.autograd.grad(fx, x, grad_outputs=v, create_graph=True)
    return v.square().sum() / xp.numel()


def trajectory_penalty(block: FlowBlock, xp: torch.Tensor, zp: torch.Tensor, *, k: int = 1,
                       init: str = "z", cond: torch.Tensor | float = 0.0) -> torch.Tensor:
    """mean_B ||F(X^(k)) - x||^2 / ||x||^2 with X^(k) k Jacobi iterations from ``init``.

    The iterations carry no gradient; only the last update does, through the parameters.
    The norm is the sampler's stopping test's (relative, squared), so the value is the residual
    the sampler would see after k + 1 iterations if it stopped on the distance to the solution.
    """
    zp, xp = zp.detach(), xp.detach()
    with torch.no_grad():
        guess = initial_guess(zp, init)
        for _ in range(k):
            guess = fixed_point_map(block, guess, zp, cond=cond)
    with torch.enable_grad():
        step = fixed_point_map(block, guess, zp, cond=cond)  # (B, N, D)
    dtype = torch.promote_types(xp.dtype, torch.float32)  # bf16 squares lose the tail
    err = (step - xp).to(dtype).square().sum(dim=(1, 2))
    return (err / xp.to(dtype).square().sum(dim=(1, 2)).clamp_min(1e-12)).mean()


# ------------------------------------------------------------------------------ configuration
@dataclass
class SpeedTerm:
    """One named loss term (see the module docstring for the kinds).

    Attributes:
        name: logged as ``train/<name>`` (and ``train/<name>/<block>``).
        kind: "jacobian", "chain" or "trajectory".
        weight: multiplier of the term in the loss, on the steps where it runs.
        blocks: forward block ids; None = every block with layers.
        crm_share: instead of ids, the blocks whose CRM share (percent) is at least this,
            measured on the step's rows with the unconditional embedding.
        every: run on every k-th optimisation step ...
        prob: ... and then with this probability (1 = always; the draw depends on the step and
            seed only, so every rank and a resumed run agree).
        k: the Jacobian's power (chain) or the Jacobi iterations before the penalised one
            (trajectory); fixed to 1 for "jacobian".
        probes: Hutchinson probe vectors per sample (Jacobian kinds).
        rows: use the first ``rows`` samples of the batch only (None = all): the cost knob.
        balance: how block values combine: "sum", "share" or "max".
        init: the trajectory's initial guess, "z" or "zeros" (as the sampler's ``init``).
    """

    name: str
    kind: str
    weight: float
    blocks: tuple[int, ...] | None = None
    crm_share: float | None = None
    every: int = 1
    prob: float = 1.0
    k: int = 1
    probes: int = 1
    rows: int | None = None
    balance: str = "share"
    init: str = "z"
    seed: int = field(default=0, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["blocks"] = None if self.blocks is None else list(self.blocks)
        return d

    def due(self, step: int) -> bool:
        """Whether the term runs at optimisation step ``step`` (0-based)."""
        if step % self.every:
            return False
        if self.prob >= 1.0:
            return True
        return random.Random(self.seed * 1_000_003 + step).random() < self.prob

    def block_values(self, model, tokens: torch.Tensor, outputs: Sequence[torch.Tensor],
                     labels: torch.Tensor | None, *, generator: torch.Generator | None = None
                     ) -> dict[int, torch.Tensor]:
        """The term of each selected block, unweighted and uncombined.

        Args:
            model: the TarFlow.
            tokens: (B, N, D) the patchified (noised) training input.
            outputs: the forward pass's ``block_outputs`` (block b's input is b - 1's output).
            labels: (B,) the training labels (after label drop) or None.
        """
        rows = slice(None) if self.rows is None else slice(0, self.rows)
        ids = self.select(model, tokens[rows], labels)
        values = {}
        for b in ids:
            block = model.blocks[b]
            x = (tokens if b == 0 else outputs[b - 1])[rows].detach()
            xp = permute(x, block.flipped)
            zp = permute(outputs[b][rows].detach(), block.flipped)
            cond = block.class_bias(None if labels is None else labels[rows])
            if self.kind == "trajectory":
                values[b] = trajectory_penalty(block, xp, zp, k=self.k, init=self.init,
                                               cond=cond)
                continue
            total = 0.0
            for _ in range(self.probes):
                u = torch.randn(xp.shape, generator=generator, device=xp.device,
                                dtype=xp.dtype)
                total = total + chain_penalty(block, xp, zp, u, k=self.k, cond=cond)
            values[b] = total / self.probes
        return values

    def select(self, model, tokens: torch.Tensor, labels: torch.Tensor | None) -> list[int]:
        """The forward block ids this step penalises (identity blocks never)."""
        ids = range(len(model.blocks)) if self.blocks is None else self.blocks
        ids = [b for b in ids if not model.blocks[b].is_identity]
        if self.crm_share is None:
            return ids
        was_training = model.training
        model.eval()
        try:
            ranking = rank_blocks(model, model.unpatchify(tokens.detach()))
        finally:
            model.train(was_training)
        return [r.block for r in ranking if r.block in ids and r.share >= self.crm_share]

    def combine(self, values: Mapping[int, torch.Tensor]) -> torch.Tensor | None:
        """One scalar from the per-block values (None when no block was selected)."""
        if not values:
            return None
        v = torch.stack([torch.as_tensor(t, dtype=torch.float32).reshape(()) for t in
                         values.values()])
        if self.balance == "max":
            return v.max()
        if self.balance == "share":
            w = v.detach() / v.detach().sum().clamp_min(1e-12)  # sums to 1, the largest gets most
            return len(v) * (w * v).sum()
        return v.sum()


_KNOBS = {f for f in SpeedTerm.__dataclass_fields__ if f not in ("name", "seed")}


def parse_speed_terms(specs: Mapping[str, Mapping[str, Any]] | None, config: TarFlowConfig, *,
                      key: str = "module.speed_terms", seed: int = 0) -> list[SpeedTerm]:
    """Validate ``{name: {kind, weight, blocks, every, prob, k, ...}}`` into terms.

    ``blocks``: "all" (or null), a forward block id, a list of ids, or "crm:<percent>" (the
    blocks whose CRM share is at least that). Every problem raises one ``ValueError`` naming
    ``<key>.<name>.<field>``. A term with weight 0 is dropped (a way to switch one off).
    """
    terms = []
    for name, spec in (specs or {}).items():
        where = f"{key}.{name}"
        if spec is None:
            continue  # `module.speed_terms.x=null` removes a term an experiment set
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where}: expected a mapping of {sorted(_KNOBS)}, got {spec!r}")
        spec = dict(spec)
        unknown = sorted(set(spec) - _KNOBS)
        if unknown:
            raise ValueError(f"{where}: unknown option(s) {unknown}; known: {sorted(_KNOBS)}")
        kind = spec.get("kind")
        if kind not in KINDS:
            raise ValueError(f"{where}.kind={kind!r} must be one of {KINDS}")
        weight = _number(where, "weight", spec.get("weight"), float)
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"{where}.weight={weight} must be a finite number >= 0")
        if weight == 0:
            continue
        spec["blocks"], spec["crm_share"] = _blocks(where, spec.get("blocks", "all"),
                                                    spec.get("crm_share"), config)
        for knob in ("every", "k", "probes"):
            if knob in spec and (_number(where, knob, spec[knob], int) < 1):
                raise ValueError(f"{where}.{knob}={spec[knob]} must be an integer >= 1")
        if kind == "jacobian" and spec.get("k", 1) != 1:
            raise ValueError(f"{where}.k={spec['k']}: kind jacobian is k = 1; use kind chain")
        if "rows" in spec and spec["rows"] is not None and _number(where, "rows", spec["rows"],
                                                                   int) < 1:
            raise ValueError(f"{where}.rows={spec['rows']} must be an integer >= 1 or null")
        prob = _number(where, "prob", spec.get("prob", 1.0), float)
        if not 0.0 < prob <= 1.0:
            raise ValueError(f"{where}.prob={prob} must lie in (0, 1]")
        if spec.get("balance", "share") not in BALANCES:
            raise ValueError(f"{where}.balance={spec['balance']!r} must be one of {BALANCES}")
        if spec.get("init", "z") not in INPUT_INITS:
            raise ValueError(f"{where}.init={spec['init']!r} must be one of {INPUT_INITS}")
        spec["weight"], spec["prob"] = weight, prob
        terms.append(SpeedTerm(name=str(name), seed=seed, **spec))
    return terms


def _number(where: str, knob: str, value: Any, kind: type) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and isinstance(value, float) and not value.is_integer()):
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"{where}.{knob}={value!r} must be {what}")
    return kind(value)


def _blocks(where: str, blocks: Any, crm_share: Any, config: TarFlowConfig
            ) -> tuple[tuple[int, ...] | None, float | None]:
    """(block ids or None = all, CRM share threshold or None) from the ``blocks`` knob."""
    T = config.num_blocks
    if isinstance(blocks, str) and blocks.startswith("crm:"):
        try:
            crm_share = float(blocks[4:])
        except ValueError:
            raise ValueError(f"{where}.blocks={blocks!r}: expected crm:<percent>, "
                             f"e.g. crm:25") from None
        blocks = "all"
    if crm_share is not None and not 0.0 <= float(crm_share) <= 100.0:
        raise ValueError(f"{where}.crm_share={crm_share} must be a percentage in [0, 100]")
    if blocks is None or blocks == "all":
        return None, None if crm_share is None else float(crm_share)
    ids = [blocks] if isinstance(blocks, int) and not isinstance(blocks, bool) else blocks
    if isinstance(ids, str) or not isinstance(ids, Sequence) or not all(
            isinstance(b, int) and not isinstance(b, bool) for b in ids):
        raise ValueError(f"{where}.blocks={blocks!r}: expected 'all', a block id, a list of "
                         f"ids or 'crm:<percent>'")
    bad = [b for b in ids if not 0 <= b < T]
    if bad:
        raise ValueError(f"{where}.blocks: unknown block id(s) {bad}; the model has blocks "
                         f"0..{T - 1}")
    empty = [b for b in ids if config.block(b).layers == 0]
    if empty:
        raise ValueError(f"{where}.blocks: block(s) {empty} have no layers (identity); "
                         f"nothing to penalise")
    return tuple(dict.fromkeys(ids)), None if crm_share is None else float(crm_share)
