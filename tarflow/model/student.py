"""A distilled student of a TarFlow teacher: noise tokens -> the teacher's sample in K steps.

A TarFlow is a bijection, so every noise ``z`` has exactly one sample ``x = F^-1(z)``: the pairs
``(z, x)`` (:mod:`tarflow.sampling.pairs`) are a regression target with no ambiguity. The student
is a plain, **non-causal** transformer on the teacher's tokens (B, N, D) that learns the straight
path between them (flow matching on a deterministic coupling, as in Distilled Decoding, arXiv
2412.17153)::

    x_t = (1 - t) z + t x,        v(x_t, t) ~ x - z,
    K Euler steps from z:         x_{k+1} = x_k + v(x_k, k / K) / K.

At ``K = 1`` this is direct regression (``x^ = z + v(z, 0)``); more steps may refine the guess
where training covered ``t > 0``. One student serves any K.

**A student is not a bijection and has no likelihood.** It maps noise to approximate samples of
its teacher (at the teacher's sampler and guidance it was distilled from); it has no inverse, no
log-determinant and no bits/dim. Its guess can also seed the teacher's exact sampler
(``tarflow.sampling.student``), whose fixed point is the teacher's own sample.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tarflow.files import atomic_torch_save
from tarflow.model.attention import LayerNorm32
from tarflow.model.config import TarFlowConfig

# Said at load time and in every command's help: what a student is not.
NOT_A_FLOW = ("a distilled student is not a bijection and has no likelihood: it samples "
              "(approximately) like its teacher, but has no inverse and no bits/dim")


@dataclass(frozen=True)
class StudentConfig:
    """The student's own architecture (its tokens' shape comes from the teacher's config).

    Attributes:
        channels: transformer width.
        layers: transformer layers (non-causal, pre-LayerNorm).
        head_dim: attention head width.
        expansion: MLP hidden width multiplier.
        steps: default number of Euler steps K when sampling (``sampler.steps`` overrides).
    """

    channels: int = 128
    layers: int = 4
    head_dim: int = 32
    expansion: int = 4
    steps: int = 1

    def __post_init__(self) -> None:
        for name in ("channels", "layers", "head_dim", "expansion", "steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"student.{name}={getattr(self, name)} must be >= 1")
        if self.channels % self.head_dim:
            raise ValueError(f"student.channels={self.channels} is not a multiple of "
                             f"student.head_dim={self.head_dim}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> StudentConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown student option(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


class _Layer(nn.Module):
    """h += Attn(LN(h)) (every token sees every token); h += MLP(LN(h))."""

    def __init__(self, channels: int, heads: int, expansion: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = LayerNorm32(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.norm2 = LayerNorm32(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, expansion * channels), nn.GELU(),
                                 nn.Linear(expansion * channels, channels))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, N, C = h.shape
        qkv = self.qkv(self.norm1(h)).view(B, N, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, heads, N, head_dim)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim), no mask
        h = h + self.proj(a.transpose(1, 2).reshape(B, N, C))
        return h + self.mlp(self.norm2(h))


def _time_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) times in [0, 1] -> (B, dim) sinusoidal features (DiT's timestep embedding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([angles.cos(), angles.sin()], dim=1).to(t.dtype)


class Student(nn.Module):
    """Noise tokens (B, N, D) -> the teacher's sample tokens, in K Euler steps.

    ``config`` is the **teacher's** :class:`TarFlowConfig` (token shapes, classes, prior), so
    the fixed sample set, spaces and summaries treat a student like its teacher;
    ``student_config`` is its own architecture. ``teacher`` records where it came from
    (``path``, ``fingerprint``, ``sampler``, ``guidance``, ``pairs``).

    Example:
        >>> x = student.generate(noise, y, steps=2)       # (B, N, D) tokens
        >>> images = student.unpatchify(x)
    """

    is_student = True
    var: torch.Tensor

    def __init__(self, teacher_config: TarFlowConfig, config: StudentConfig,
                 teacher: dict | None = None) -> None:
        super().__init__()
        self.config = teacher_config
        self.student_config = config
        self.teacher = dict(teacher or {})
        N, D, C = teacher_config.num_patches, teacher_config.token_dim, config.channels
        self.proj_in = nn.Linear(D, C)
        self.pos_embed = nn.Parameter(torch.randn(N, C) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(C, C), nn.SiLU(), nn.Linear(C, C))
        if teacher_config.conditional:
            self.class_embed = nn.Parameter(torch.randn(teacher_config.num_classes, C) * 0.02)
        self.layers = nn.ModuleList(_Layer(C, C // config.head_dim, config.expansion)
                                    for _ in range(config.layers))
        self.norm = LayerNorm32(C)
        self.proj_out = nn.Linear(C, D)
        # Zero output layer: a fresh student predicts v = 0, i.e. returns its noise.
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        # The teacher's prior variance: the sample set draws noise from it as for the teacher.
        self.register_buffer("var", torch.ones(N, D))

    # ------------------------------------------------------------------ tokens <-> images
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D), the teacher's token layout."""
        P = self.config.patch_size
        return F.unfold(x, kernel_size=P, stride=P).transpose(1, 2)  # (B, D, N) -> (B, N, D)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, C, H, W)."""
        P, S = self.config.patch_size, self.config.img_size
        return F.fold(tokens.transpose(1, 2), output_size=S, kernel_size=P, stride=P)

    # ------------------------------------------------------------------ the network
    def velocity(self, x: torch.Tensor, t: torch.Tensor,
                 y: torch.Tensor | None = None) -> torch.Tensor:
        """v(x_t, t): (B, N, D) tokens, (B,) times in [0, 1], (B,) labels (-1 or None: the
        mean class embedding) -> (B, N, D)."""
        h = self.proj_in(x) + self.pos_embed  # (B, N, C)
        c = self.time_mlp(_time_features(t, h.shape[-1]).to(h.dtype))  # (B, C)
        if self.config.conditional:
            null = self.class_embed.mean(0, keepdim=True)  # (1, C) as the teacher's null class
            if y is None:
                c = c + null
            else:
                cls = self.class_embed[y.clamp_min(0)]  # (B, C)
                c = c + torch.where((y < 0)[:, None], null, cls)
        h = h + c[:, None]
        for layer in self.layers:
            h = layer(h)
        return self.proj_out(self.norm(h))

    def generate(self, noise: torch.Tensor, y: torch.Tensor | None = None, *,
                 steps: int | None = None) -> torch.Tensor:
        """K Euler steps of the learnt path from ``noise`` (B, N, D); returns (B, N, D)."""
        K = int(steps or self.student_config.steps)
        if K < 1:
            raise ValueError(f"steps={K} must be >= 1")
        x = noise
        for k in range(K):
            t = torch.full((x.shape[0],), k / K, device=x.device, dtype=x.dtype)
            x = x + self.velocity(x, t, y) / K  # Euler step.
        return x

    # ------------------------------------------------------------------ checkpoints
    def to_payload(self) -> dict:
        """What a student checkpoint holds (a plain dict; ``kind`` tells it from a TarFlow)."""
        return {"kind": "student", "student_config": self.student_config.to_dict(),
                "tarflow_config": self.config.to_dict(), "teacher": self.teacher,
                "state_dict": self.state_dict()}

    def save_checkpoint(self, path: str | Path) -> Path:
        return atomic_torch_save(self.to_payload(), path)

    @classmethod
    def from_payload(cls, obj: dict, *, map_location: str | torch.device = "cpu") -> Student:
        """A student from :meth:`to_payload`'s dict or a Lightning checkpoint of one."""
        info = student_info(obj)
        if info is None:
            raise ValueError("not a student checkpoint (no student_config)")
        teacher_cfg, cfg, teacher = info
        net = cls(teacher_cfg, cfg, teacher)
        state = obj.get("state_dict", {})
        if any(k.startswith("net.") for k in state):  # a Lightning checkpoint
            state = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
        net.load_state_dict(state, strict=True)
        return net.to(map_location)


def student_info(obj: dict) -> tuple[TarFlowConfig, StudentConfig, dict] | None:
    """(teacher config, student config, teacher record) of a student checkpoint's dict (ours or
    a Lightning one), or None for any other file."""
    if obj.get("kind") == "student":
        return (TarFlowConfig(**obj["tarflow_config"]),
                StudentConfig.from_dict(obj["student_config"]), dict(obj.get("teacher") or {}))
    hparams = obj.get("hyper_parameters")
    if isinstance(hparams, dict) and isinstance(hparams.get("student"), dict):
        return (TarFlowConfig(**hparams["model"]), StudentConfig.from_dict(hparams["student"]),
                dict(hparams.get("teacher") or {}))
    return None


def is_student(net: nn.Module) -> bool:
    return bool(getattr(net, "is_student", False))
