"""CRM and IGM block metrics (GS-Jacobi paper) and the automatic schedule derived from them.

Both are computed on one forward pass over a batch of real images with the unconditional (mean)
class embedding, per forward block b with permuted input x and output z:

CRM_b = ||E_m[alpha * x]|| * ||W_a|| + ||W_b||,   alpha = exp(-a(x)),
    W_a / W_b the first / last D rows of proj_out.weight. A block with a large share of the total
    CRM is "tough": Jacobi converges slowly there.
IGM_b(guess) = ||E_m[X^(1) - x]||, X^(1) one Jacobi update from the guess with the true z.
    The guess with the smaller IGM starts closer; a large IGM warns of overflow.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from tarflow.model import TarFlow
from tarflow.model.flow import FlowBlock
from tarflow.model.permutation import permute
from tarflow.sampling.fixed_point import INPUT_INITS, fixed_point_map, initial_guess
from tarflow.sampling.schedule import SEQUENTIAL, BlockSchedule, SamplingSchedule

NORMS = {"spectral": 2, "1": 1, "fro": "fro"}


def matrix_norm(m: torch.Tensor, norm: str = "spectral") -> float:
    """Matrix norm by name: "spectral" (largest singular value), "1" (max column sum), "fro"."""
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} must be one of {sorted(NORMS)}")
    if not bool(torch.isfinite(m).all()):
        return float("inf")  # an overflowing block: the metric's warning sign, not a NaN
    return float(torch.linalg.matrix_norm(m.double(), ord=NORMS[norm]))


@dataclass
class BlockRank:
    """One row of the ranking table (forward block id)."""

    block: int
    crm: float
    share: float  # percent of the total CRM
    igm: dict[str, float]

    @property
    def best_init(self) -> str:
        return min(self.igm, key=self.igm.get)


@torch.no_grad()
def block_metrics(block: FlowBlock, x: torch.Tensor, z: torch.Tensor, *,
                  norm: str = "spectral") -> BlockRank:
    """CRM and IGM of one block from its forward input x and output z, both (M, N, D) raster."""
    D = x.shape[-1]
    if block.is_identity:  # nothing to solve: no cost, nothing to guess
        return BlockRank(block.index, 0.0, 0.0, dict.fromkeys(INPUT_INITS, 0.0))
    xp, zp = permute(x, block.flipped), permute(z, block.flipped)
    cond = block.class_bias(None)  # unconditional embedding, as in the paper
    a, _ = block.affine(xp, cond=cond)
    mean_ax = (xp / block.sigma(a)).mean(0)  # (N, D) = E_m[alpha * x], alpha = 1 / sigma
    w = block.proj_out.weight
    crm = matrix_norm(mean_ax, norm) * matrix_norm(w[:D], norm) + matrix_norm(w[D:], norm)
    igm = {}
    for init in INPUT_INITS:
        x1 = fixed_point_map(block, initial_guess(zp, init), zp, cond=cond)  # one update
        igm[init] = matrix_norm((x1 - xp).mean(0), norm)
    return BlockRank(block.index, crm, 0.0, igm)


@torch.no_grad()
def rank_blocks(model: TarFlow, images: torch.Tensor, y: torch.Tensor | None = None, *,
                norm: str = "spectral", chunk: int = 256) -> list[BlockRank]:
    """Rank every block by CRM (and IGM per initial guess) on real images.

    Args:
        images: (M, C, H, W) real images in [-1, 1]; the paper uses M ~ 1000.
        y: labels for the forward pass; None uses the unconditional embedding throughout.

    Returns:
        One :class:`BlockRank` per forward block, in block order, shares in percent.
    """
    outs = [model(images[i:i + chunk], None if y is None else y[i:i + chunk])
            for i in range(0, images.shape[0], chunk)]
    tokens = model.patchify(images)
    rows = []
    for b, block in enumerate(model.blocks):
        x = tokens if b == 0 else torch.cat([o.block_outputs[b - 1] for o in outs])
        z = torch.cat([o.block_outputs[b] for o in outs])
        rows.append(block_metrics(block, x, z, norm=norm))
    total = sum(r.crm for r in rows) or 1.0
    for r in rows:
        r.share = 100.0 * r.crm / total
    return rows


def schedule_from_ranking(ranking: list[BlockRank], num_patches: int, *,
                          tough_factor: float = 1.5, tough_segments: int = 8,
                          sequential_share: float = 101.0, tough_iters: int | None = None,
                          else_iters: int | None = None, tol: float = 1e-3) -> SamplingSchedule:
    """Choose segments, iteration caps and initial guesses automatically.

    The rule (also in the README):
      1. A block is *tough* when its CRM share is at least ``tough_factor`` times the uniform
         share 100/T. A tough block gets ``tough_segments`` GS segments (capped at N), or the
         sequential loop when its share reaches ``sequential_share`` percent (off by default).
      2. Every other block is pure Jacobi (one segment).
      3. Caps: ``tough_iters`` / ``else_iters`` per segment, None = the segment length (exact);
         the stopping test with tolerance ``tol`` (per-sample relative residual) ends each
         segment as soon as it has converged, so caps only bound the worst case.
      4. Each block starts from the initial guess with the smaller IGM.
    """
    T = len(ranking)
    default = BlockSchedule(1, else_iters, "z", tol)
    blocks = {}
    for r in ranking:
        init = r.best_init
        if r.share >= sequential_share:
            blocks[r.block] = BlockSchedule(SEQUENTIAL, None, init, tol)
        elif r.share >= tough_factor * 100.0 / T:
            blocks[r.block] = BlockSchedule(min(tough_segments, num_patches), tough_iters, init,
                                            tol)
        else:
            blocks[r.block] = BlockSchedule(1, else_iters, init, tol)
    blocks = {b: s for b, s in blocks.items() if s != default}  # keep only what differs
    return SamplingSchedule(blocks, default, name="")


def ranking_table(ranking: list[BlockRank], schedule: SamplingSchedule | None = None) -> str:
    """Plain-text table: block, CRM, share, IGM per guess, and the chosen settings."""
    head = f"{'block':>5} {'CRM':>10} {'share%':>7} " + " ".join(f"{'IGM_' + i:>10}"
                                                                  for i in INPUT_INITS)
    if schedule is not None:
        head += f" {'segments':>8} {'max_iters':>9} {'init':>5}"
    lines = [head]
    for r in ranking:
        line = f"{r.block:>5} {r.crm:>10.4g} {r.share:>7.2f} " + " ".join(
            f"{r.igm[i]:>10.4g}" for i in INPUT_INITS)
        if schedule is not None:
            s = schedule.for_block(r.block)
            seg = "seq" if s.segments == SEQUENTIAL else str(s.segments)
            line += f" {seg:>8} {str(s.max_iters or 'exact'):>9} {s.init:>5}"
        lines.append(line)
    return "\n".join(lines)


def ranking_records(ranking: list[BlockRank]) -> list[dict]:
    return [{**asdict(r), "best_init": r.best_init} for r in ranking]
