"""One TarFlow block: a causal transformer that parameterises an affine autoregressive flow.

Forward (data -> noise), in the block's own token order ("permuted frame"):
    z_i = (x_i - b_i(x_<i)) / sigma(a_i(x_<i)),    logdet = -mean(log sigma)
where (a_i, b_i) is the transformer output at position i - 1 (the output is shifted right by one, so
token 0 passes through unchanged) and sigma = exp (TarFlow; logdet = -mean(a)) or STARFlow's
softplus(a + log(e - 1)), which is 1 at a = 0 as exp is. A block of 0 layers is the identity
(:class:`IdentityBlock`; STARFlow's shallow blocks may be). Sampling inverts this position by
position; the samplers in ``tarflow.sampling`` drive :meth:`FlowBlock.predict` directly; this
module keeps the exact sequential inverse as the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tarflow.model.attention import KVCache
from tarflow.model.config import TarFlowConfig
from tarflow.model.guidance import Guidance
from tarflow.model.layers import TransformerLayer
from tarflow.model.permutation import is_flipped, permute


def exp32(a: torch.Tensor) -> torch.Tensor:
    """exp in at least float32: exp of a bf16 log-scale loses the low bits that matter for z."""
    if a.dtype in (torch.float16, torch.bfloat16):
        return a.float().exp().to(a.dtype)
    return a.exp()


# softplus(a + SOFTPLUS_SHIFT) = 1 at a = 0, so a zero-initialised proj_out is still the identity.
SOFTPLUS_SHIFT = math.log(math.e - 1.0)


def softplus32(a: torch.Tensor) -> torch.Tensor:
    """STARFlow's scale softplus(a + log(e - 1)), in at least float32 like :func:`exp32`."""
    low = a.dtype in (torch.float16, torch.bfloat16)
    sigma = F.softplus((a.float() if low else a) + SOFTPLUS_SHIFT)
    return sigma.to(a.dtype) if low else sigma


class IdentityBlock(nn.Module):
    """A flow block of 0 layers: z = x, logdet 0, no parameters (STARFLOW.md §2)."""

    is_identity = True

    def __init__(self, config: TarFlowConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.flipped = is_flipped(index)
        self.num_patches = config.num_patches
        self.token_dim = config.token_dim
        self.class_embed = None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x.new_zeros(x.shape[0], dtype=torch.promote_types(x.dtype, torch.float32))

    def reverse(self, z: torch.Tensor, y: torch.Tensor | None = None, **_) -> torch.Tensor:
        return z


def make_block(config: TarFlowConfig, index: int) -> FlowBlock | IdentityBlock:
    """Block ``index`` as the config describes it (an identity when it has no layers)."""
    if config.block(index).layers == 0:
        return IdentityBlock(config, index)
    return FlowBlock(config, index)


class FlowBlock(nn.Module):
    """State-dict keys: pos_embed, class_embed (conditional), attn_mask, proj_in, attn_blocks,
    proj_out (ALGORITHMS.md §1)."""

    attn_mask: torch.Tensor
    is_identity = False

    def __init__(self, config: TarFlowConfig, index: int) -> None:
        super().__init__()
        spec = config.block(index)  # depth, width and conditioning of this block
        N, D, Ch = config.num_patches, config.token_dim, spec.channels
        self.index = index
        self.flipped = is_flipped(index)
        self.num_patches = N
        self.token_dim = D
        self.sigma = softplus32 if config.scale == "softplus" else exp32  # a -> scale
        self.proj_in = nn.Linear(D, Ch)
        self.pos_embed = nn.Parameter(torch.randn(N, Ch) * 0.01)
        if spec.conditional:
            self.class_embed = nn.Parameter(torch.randn(config.num_classes, 1, Ch) * 0.01)
        else:
            self.class_embed = None
        self.attn_blocks = nn.ModuleList(
            TransformerLayer(Ch, config.head_dim, config.expansion) for _ in range(spec.layers)
        )
        self.proj_out = nn.Linear(Ch, 2 * D)
        # Zero output layer: a = b = 0, so a fresh block (and model) is exactly the identity.
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        # Kept for state-dict compatibility with the official checkpoints; SDPA's causal flag
        # is what actually masks.
        self.register_buffer("attn_mask", torch.tril(torch.ones(N, N)))
        # Boolean copy for slicing per call. A plain attribute, not a buffer: buffers are
        # averaged by EMA (no lerp for bool) and would change what .to()/state_dict see.
        self._causal = torch.ones(N, N, dtype=torch.bool).tril()

    # ----------------------------------------------------------------------------- helpers
    def guided(self, guidance: Guidance) -> Guidance:
        """The guidance this block runs with: none where it has no class embedding and the
        temperature is 1 (both branches would be one computation, run twice)."""
        return guidance.for_block(self.class_embed is not None)

    def class_bias(self, y: torch.Tensor | None) -> torch.Tensor | float:
        """Class embedding per row, (B, 1, Ch); y == -1 (or None) is the mean embedding."""
        if self.class_embed is None:
            return 0.0
        null = self.class_embed.mean(dim=0, keepdim=True)  # (1, 1, Ch)
        if y is None:
            return null
        emb = self.class_embed[y.clamp(min=0)]  # (B, 1, Ch)
        return torch.where((y < 0).view(-1, 1, 1), null, emb)

    def new_cache(self, batch: int, *, dtype: torch.dtype, device: torch.device) -> KVCache:
        """An empty KV cache sized for this block and ``batch`` network rows."""
        att = self.attn_blocks[0].attention
        return KVCache.empty(len(self.attn_blocks), batch, att.num_heads, self.num_patches,
                             att.head_dim, dtype=dtype, device=device)

    # ----------------------------------------------------------------------------- network
    def predict(self, xp: torch.Tensor, *, cond: torch.Tensor | float = 0.0, start: int = 0,
                cache: KVCache | None = None,
                q_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Raw transformer output for tokens [start, start + L) of the permuted sequence.

        The output at token t parameterises position t + 1 (the shift is the caller's business).

        Args:
            xp: (B, L, D) tokens in this block's order.
            cond: class bias from :meth:`class_bias`, (B, 1, Ch) or 0.
            cache: KV cache holding tokens [0, start); these tokens are written into it.
            q_scale: (B, 1, 1, 1) per-row query factor (attention temperature of guidance).

        Returns:
            (B, L, 2D): a = [..., :D], b = [..., D:].
        """
        L, N = xp.shape[1], self.num_patches
        # Positions [start, start + L) of the permuted order; slice before flipping (hot path).
        if self.flipped:
            pos = self.pos_embed[N - start - L:N - start].flip(0)  # (L, Ch)
        else:
            pos = self.pos_embed[start:start + L]
        h = self.proj_in(xp) + pos + cond  # (B, L, Ch)
        mask = None
        if cache is not None and L > 1 and start > 0:
            if self._causal.device != xp.device:
                self._causal = self._causal.to(xp.device)
            mask = self._causal[start:start + L, :start + L]  # (L, start + L) causal rows
        for layer, block in enumerate(self.attn_blocks):
            h = block(h, layer=layer, cache=cache, start=start, q_scale=q_scale, mask=mask)
        return self.proj_out(h)

    def affine(self, xp: torch.Tensor, *, cond: torch.Tensor | float = 0.0,
               q_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) for every position of a full permuted sequence, each (B, N, D).

        The network output at token i is shifted to position i + 1; position 0 gets a = b = 0.
        """
        out = self.predict(xp, cond=cond, q_scale=q_scale)  # (B, N, 2D)
        out = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)  # shift right by one
        a, b = out.chunk(2, dim=-1)
        return a, b

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Data -> noise for this block.

        Args:
            x: (B, N, D) tokens in raster order.
            y: (B,) labels, -1 for the null class; None = null for every row.

        Returns:
            z (B, N, D) in raster order and logdet (B,) = -mean over (N, D) of log sigma.
        """
        xp = permute(x, self.flipped)
        a, b = self.affine(xp, cond=self.class_bias(y))
        # Reduce in >= float32: a bf16 mean over N*D terms is too coarse for a likelihood.
        a32 = a.to(torch.promote_types(a.dtype, torch.float32))
        if self.sigma is exp32:
            zp, log_sigma = (xp - b) * exp32(-a), a32
        else:
            sigma = self.sigma(a)
            zp, log_sigma = (xp - b) / sigma, softplus32(a32).log()
        return permute(zp, self.flipped), -log_sigma.mean(dim=(1, 2))

    @torch.no_grad()
    def reverse(self, z: torch.Tensor, y: torch.Tensor | None = None, *,
                guidance: Guidance = Guidance(), cache: KVCache | None = None,
                callback: Callable[[int], None] | None = None) -> torch.Tensor:
        """Exact sequential inverse with a preallocated KV cache: N - 1 single-token steps.

        Args:
            z: (B, N, D) this block's output, raster order.
            y: (B,) labels or None.
            cache: a fresh cache to use instead of a preallocated one (benchmarks plug in the
                reference code's growing cache here).
            callback: called with the step index after every step; it may raise to abandon
                the loop (the sampling planner stops candidates that run over budget so).

        Returns:
            x: (B, N, D) with ``forward(x, y)[0] == z`` up to rounding.
        """
        B, N, D = z.shape
        guidance = self.guided(guidance)
        zp = permute(z, self.flipped)
        xp = zp.clone()  # position 0 is the identity: x_0 = z_0
        cond = self.class_bias(guidance.labels(y, B, z.device))
        q_scale = guidance.q_scale(B, z.device, z.dtype)
        if cache is None:
            cache = self.new_cache(B * (2 if guidance.active else 1), dtype=z.dtype,
                                   device=z.device)
        positions = torch.arange(1, N, device=z.device)  # output position of step i is i + 1
        for i in range(N - 1):
            token = guidance.expand(xp[:, i:i + 1])  # (B', 1, D)
            out = self.predict(token, cond=cond, start=i, cache=cache, q_scale=q_scale)
            sigma, mu = guidance.scale_shift(out, positions[i:i + 1], N, self.sigma)  # (B, 1, D)
            xp[:, i + 1] = torch.addcmul(mu[:, 0], zp[:, i + 1], sigma[:, 0])
            if callback is not None:
                callback(i)
        return permute(xp, self.flipped)
