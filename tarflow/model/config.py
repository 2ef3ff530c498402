"""TarFlow architecture configuration and the paper's named presets.

A configuration is written in the paper's P-Ch-T-K form: patch size P, transformer width Ch,
T flow blocks, K transformer layers per block. Everything else (sequence length N, token size D,
number of heads) is derived here once, so no other module recomputes it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class TarFlowConfig:
    """Hyper-parameters that fix a TarFlow's shapes (and hence its state-dict layout).

    Attributes:
        img_size: square image side in pixels.
        in_channels: image channels (3 for RGB, 1 for grayscale).
        patch_size: P, side of the square patch that becomes one token.
        channels: Ch, transformer width.
        num_blocks: T, number of flow blocks.
        layers_per_block: K, transformer layers in each block.
        num_classes: 0 for an unconditional model.
        head_dim: attention head width (64 in the paper).
        expansion: MLP hidden width multiplier.
        noise_std: training noise sigma, kept so self-denoising can find it (not a shape).
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

    def __post_init__(self) -> None:
        problems = []
        for name in ("img_size", "in_channels", "patch_size", "channels", "num_blocks",
                     "layers_per_block", "head_dim", "expansion"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name}={getattr(self, name)} must be a positive integer")
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
        """The paper's P-Ch-T-K name, e.g. ``P4-Ch1024-T8-K8``."""
        return f"P{self.patch_size}-Ch{self.channels}-T{self.num_blocks}-K{self.layers_per_block}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> TarFlowConfig:
        return dataclasses.replace(self, **changes)


# The paper's four configurations (ALGORITHMS.md §1) and two small ones for tests and the demo.
PRESETS: dict[str, TarFlowConfig] = {
    "img64_uncond": TarFlowConfig(64, 3, 2, 768, 8, 8, 0, noise_std=0.05),
    "img64_cond": TarFlowConfig(64, 3, 4, 1024, 8, 8, 1000, noise_std=0.05),
    "img128_cond": TarFlowConfig(128, 3, 4, 1024, 8, 8, 1000, noise_std=0.15),
    "afhq256_cond": TarFlowConfig(256, 3, 8, 768, 8, 8, 3, noise_std=0.07),
    # Unit-test size: N = 16 tokens of D = 4, 2 blocks of 2 layers, width 32 (two 16-d heads).
    "tiny": TarFlowConfig(8, 1, 2, 32, 2, 2, 0, head_dim=16, noise_std=0.0),
    # The demo model trained on the embedded digits (ALGORITHMS.md / issue 6 reference size).
    "demo": TarFlowConfig(16, 1, 2, 128, 4, 2, 10, noise_std=0.05),
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
