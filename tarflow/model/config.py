"""TarFlow architecture configuration and the paper's named presets.

A configuration is written in the paper's P-Ch-T-K form: patch size P, transformer width Ch,
T flow blocks, K transformer layers per block. Everything else (sequence length N, token size D,
number of heads) is derived here once, so no other module recomputes it.

STARFlow-style deep-shallow stacks (STARFLOW.md §2-3) are the same object with uneven blocks:
K may be a list of T depths in forward order (a depth of 0 is the identity), the last forward
block (the deep one, sampled first) may be wider (``deep_channels``), may be the only conditional
block (``cond_deep_only``), and the scale may be a softplus instead of an exponential.
:meth:`TarFlowConfig.block` is the one place that says what block b is.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

SCALES = ("exp", "softplus")


@dataclass(frozen=True)
class BlockSpec:
    """Shapes and options of one flow block, as :meth:`TarFlowConfig.block` decides them."""

    layers: int  # transformer layers; 0 = the identity
    channels: int  # transformer width
    heads: int
    conditional: bool  # has a class embedding


@dataclass(frozen=True)
class TarFlowConfig:
    """Hyper-parameters that fix a TarFlow's shapes (and hence its state-dict layout).

    Attributes:
        img_size: square image side in pixels.
        in_channels: image channels (3 for RGB, 1 for grayscale).
        patch_size: P, side of the square patch that becomes one token.
        channels: Ch, transformer width.
        num_blocks: T, number of flow blocks.
        layers_per_block: K, transformer layers in each block; or T depths in forward order
            (a deep-shallow stack, e.g. ``(2, 2, 2, 18)``; 0 = an identity block).
        num_classes: 0 for an unconditional model.
        head_dim: attention head width (64 in the paper).
        expansion: MLP hidden width multiplier.
        noise_std: training noise sigma, kept so self-denoising can find it (not a shape).
        deep_channels: width of the last forward block (the deep one) if not ``channels``; its
            head count is ``deep_channels / head_dim``.
        cond_deep_only: only the deep block has a class embedding (STARFlow's text-to-image
            models); the shallow blocks are unconditional.
        scale: "exp" (TarFlow: sigma = exp(a)) or "softplus" (STARFlow: sigma = softplus(a + c),
            with c = log(e - 1) so that a = 0 still means sigma = 1).
    """

    img_size: int = 64
    in_channels: int = 3
    patch_size: int = 2
    channels: int = 768
    num_blocks: int = 8
    layers_per_block: int = 8
    num_classes: int = 0
    head_dim: int = 64
    expansion: int = 4
    noise_std: float = 0.0
    deep_channels: int | None = None
    cond_deep_only: bool = False
    scale: str = "exp"

    def __post_init__(self) -> None:
        problems = []
        for name in ("img_size", "in_channels", "patch_size", "channels", "num_blocks",
                     "head_dim", "expansion"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name}={getattr(self, name)} must be a positive integer")
        problems += self._check_depths()
        if self.deep_channels is not None and (int(self.deep_channels) < 1 or
                                               int(self.deep_channels) % int(self.head_dim)):
            problems.append(f"deep_channels={self.deep_channels} must be a positive multiple of "
                            f"head_dim={self.head_dim} (its heads are deep_channels / head_dim)")
        if self.scale not in SCALES:
            problems.append(f"scale={self.scale!r} must be one of {SCALES}")
        if self.cond_deep_only and self.num_classes == 0:
            problems.append("cond_deep_only=true needs a class-conditional model (num_classes > 0)")
        if self.num_classes < 0:
            problems.append(f"num_classes={self.num_classes} must be >= 0 (0 = unconditional)")
        if not problems and self.img_size % self.patch_size:
            problems.append(
                f"img_size={self.img_size} is not divisible by patch_size={self.patch_size}"
            )
        if not problems and self.channels % self.head_dim:
            problems.append(
                f"channels={self.channels} is not divisible by head_dim={self.head_dim}"
            )
        if self.noise_std < 0:
            problems.append(f"noise_std={self.noise_std} must be >= 0")
        if problems:
            raise ValueError("invalid TarFlow configuration: " + "; ".join(problems))

    def _check_depths(self) -> list[str]:
        """Validate K and store it as an int or a tuple (frozen, hashable, YAML-safe as a list
        via :meth:`to_dict`)."""
        K = self.layers_per_block
        if isinstance(K, (list, tuple)):
            depths = tuple(K)
            if len(depths) != self.num_blocks:
                return [f"layers_per_block has {len(depths)} depths for num_blocks="
                        f"{self.num_blocks}; give one per block, in forward order"]
            if any(not isinstance(k, int) or isinstance(k, bool) or k < 0 for k in depths):
                return [f"layers_per_block={list(depths)} must be integers >= 0"]
            if depths[-1] < 1:
                return ["the last forward block (the deep one, sampled first) needs at least "
                        "one layer"]
            object.__setattr__(self, "layers_per_block",
                               depths[0] if len(set(depths)) == 1 else depths)
            return []
        if not isinstance(K, int) or isinstance(K, bool) or K < 1:
            return [f"layers_per_block={K!r} must be a positive integer or a list of "
                    f"{self.num_blocks} depths"]
        return []

    def block(self, b: int) -> BlockSpec:
        """Block b's depth, width, heads and whether it is conditional (forward block id)."""
        K = self.layers_per_block
        deep = b == self.num_blocks - 1
        channels = self.deep_channels if deep and self.deep_channels else self.channels
        return BlockSpec(layers=K if isinstance(K, int) else K[b], channels=channels,
                         heads=channels // self.head_dim,
                         conditional=self.conditional and (deep or not self.cond_deep_only))

    @property
    def uniform(self) -> bool:
        """Every block alike, as TarFlow (and the official checkpoints) have them."""
        return (isinstance(self.layers_per_block, int) and not self.cond_deep_only
                and self.deep_channels in (None, self.channels) and self.scale == "exp")

    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(self.block(b).layers for b in range(self.num_blocks))

    # Derived sizes, named as in ALGORITHMS.md.
    @property
    def num_patches(self) -> int:
        """N, the sequence length."""
        return (self.img_size // self.patch_size) ** 2

    @property
    def token_dim(self) -> int:
        """D = C * P^2, the size of one token."""
        return self.in_channels * self.patch_size**2

    @property
    def num_heads(self) -> int:
        return self.channels // self.head_dim

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    @property
    def tag(self) -> str:
        """The paper's P-Ch-T-K name, e.g. ``P4-Ch1024-T8-K8``; a deep-shallow stack lists its
        depths and the deep width, e.g. ``P4-Ch1024-T8-K2.2.2.2.2.2.2.24-D1536``."""
        K = self.layers_per_block
        depths = str(K) if isinstance(K, int) else ".".join(map(str, K))
        deep = (f"-D{self.deep_channels}"
                if self.deep_channels not in (None, self.channels) else "")
        return f"P{self.patch_size}-Ch{self.channels}-T{self.num_blocks}-K{depths}{deep}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(self.layers_per_block, tuple):
            d["layers_per_block"] = list(self.layers_per_block)  # YAML/JSON-safe
        return d

    def replace(self, **changes) -> TarFlowConfig:
        return dataclasses.replace(self, **changes)


# The paper's four configurations (ALGORITHMS.md §1) and two small ones for tests and the demo.
PRESETS: dict[str, TarFlowConfig] = {
    "img64_uncond": TarFlowConfig(64, 3, 2, 768, 8, 8, 0, noise_std=0.05),
    "img64_cond": TarFlowConfig(64, 3, 4, 1024, 8, 8, 1000, noise_std=0.05),
    "img128_cond": TarFlowConfig(128, 3, 4, 1024, 8, 8, 1000, noise_std=0.15),
    "afhq256_cond": TarFlowConfig(256, 3, 8, 768, 8, 8, 3, noise_std=0.07),
    # Unit-test size: N = 16 tokens of D = 4, 2 blocks of 2 layers, width 32 (two 16-d heads).
    # noise_std 0.05 as conf/model/tiny.yaml, which every training test has used.
    "tiny": TarFlowConfig(8, 1, 2, 32, 2, 2, 0, head_dim=16, noise_std=0.05),
    # The demo model trained on the embedded digits (ALGORITHMS.md / issue 6 reference size).
    "demo": TarFlowConfig(16, 1, 2, 128, 4, 2, 10, noise_std=0.05),
    # STARFlow-style deep-shallow stacks (STARFLOW.md §2). The demo's: the demo model's 8 layers
    # and width spent unevenly, 1 per shallow block and 5 in the deep block (sampled first).
    "demo_deep_shallow": TarFlowConfig(16, 1, 2, 128, 4, (1, 1, 1, 5), 10, noise_std=0.05),
    # ImageNet64 cond at about TarFlow's img64_cond size (811M vs 818M parameters): STARFlow's
    # 2-layer shallow blocks, a 22-layer deep block 1.5x as wide (1536 = 24 heads of 64).
    "img64_deep_shallow": TarFlowConfig(64, 3, 4, 1024, 8, (2, 2, 2, 2, 2, 2, 2, 22), 1000,
                                        noise_std=0.05, deep_channels=1536),
    # Latent models (STARFLOW.md §5): img_size / in_channels are the latents'. The digits' 8x8x4
    # latents of the demo autoencoder, and STARFlow's class-conditional ImageNet 256 stack over
    # Stable Diffusion's 32x32x4 latents (1.41B parameters; conf/model/imagenet256_latent.yaml).
    "demo_latent": TarFlowConfig(8, 4, 2, 128, 4, 2, 10, noise_std=0.1),
    "imagenet256_latent": TarFlowConfig(32, 4, 1, 2048, 6, (2, 2, 2, 2, 2, 18), 1000,
                                        noise_std=0.3, cond_deep_only=True, scale="softplus"),
    # Unit-test size with every deep-shallow feature: an identity block, a wider deep block.
    "tiny_deep_shallow": TarFlowConfig(8, 1, 2, 32, 3, (1, 0, 2), 0, head_dim=16,
                                       deep_channels=48),
}

_TAG = re.compile(r"^P(\d+)-Ch(\d+)-T(\d+)-K(\d+)$")


def preset(name: str, **overrides) -> TarFlowConfig:
    """Return a named preset, or parse a ``P{P}-Ch{Ch}-T{T}-K{K}`` tag, with field overrides.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if name in PRESETS:
        return PRESETS[name].replace(**overrides)
    match = _TAG.match(name)
    if match:
        p, ch, t, k = (int(g) for g in match.groups())
        base = dict(patch_size=p, channels=ch, num_blocks=t, layers_per_block=k)
        return TarFlowConfig(**{**base, **overrides})
    known = ", ".join(sorted(PRESETS))
    raise ValueError(f"unknown TarFlow preset {name!r}; known presets: {known}, or a P-Ch-T-K tag")
