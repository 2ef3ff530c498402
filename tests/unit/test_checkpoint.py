"""Checkpoint loading: official key layout, round trips, clear errors, weights_only."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch

from tarflow.model import CheckpointError, TarFlow, infer_config, preset
from tests.unit.conftest import make_model


def official_keys(T: int, K: int, conditional: bool) -> set[str]:
    """The key list of ALGORITHMS.md §1, written out independently of the model code."""
    keys = {"var"}
    for b in range(T):
        p = f"blocks.{b}."
        keys |= {p + "pos_embed", p + "attn_mask", p + "proj_in.weight", p + "proj_in.bias",
                 p + "proj_out.weight", p + "proj_out.bias"}
        if conditional:
            keys.add(p + "class_embed")
        for l in range(K):
            q = f"{p}attn_blocks.{l}."
            for part in ("attention.norm", "attention.qkv", "attention.proj", "mlp.norm",
                         "mlp.main.0", "mlp.main.2"):
                keys |= {f"{q}{part}.weight", f"{q}{part}.bias"}
    return keys


@pytest.mark.parametrize("name", ["img64_cond", "img64_uncond", "afhq256_cond"])
def test_state_dict_keys_and_shapes_match_the_official_layout(name):
    cfg = preset(name)
    with torch.device("meta"):  # the paper models are large: shapes only
        sd = TarFlow(cfg).state_dict()
    assert set(sd) == official_keys(cfg.num_blocks, cfg.layers_per_block, cfg.conditional)
    N, D, Ch = cfg.num_patches, cfg.token_dim, cfg.channels
    assert sd["var"].shape == (N, D)
    assert sd["blocks.0.pos_embed"].shape == (N, Ch)
    assert sd["blocks.0.attn_mask"].shape == (N, N)
    assert sd["blocks.0.proj_in.weight"].shape == (Ch, D)
    assert sd["blocks.0.proj_out.weight"].shape == (2 * D, Ch)
    assert sd["blocks.0.attn_blocks.0.attention.qkv.weight"].shape == (3 * Ch, Ch)
    assert sd["blocks.0.attn_blocks.0.mlp.main.0.weight"].shape == (4 * Ch, Ch)
    if cfg.conditional:
        assert sd["blocks.0.class_embed"].shape == (cfg.num_classes, 1, Ch)
    assert infer_config(sd, name=f"x_model_{cfg.patch_size}_{Ch}_8_8_0.05.pth") == cfg.replace(
        noise_std=0.05)


def _official_file(tmp_path, model: TarFlow, sigma="0.05"):
    c = model.config
    path = tmp_path / f"tiny_model_{c.patch_size}_{c.channels}_{c.num_blocks}_" \
                      f"{c.layers_per_block}_{sigma}.pth"
    torch.save(model.state_dict(), path)  # a plain state dict, as the official files are
    return path


def _hand_forward(sd, x, P, heads):
    """The forward pass written straight from ALGORITHMS.md §1 over a raw state dict."""
    tokens = torch.nn.functional.unfold(x, P, stride=P).transpose(1, 2)
    T = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    total = torch.zeros(x.shape[0], dtype=x.dtype)
    for b in range(T):
        p = f"blocks.{b}."
        h_in = tokens.flip(1) if b % 2 else tokens
        pos = sd[p + "pos_embed"].flip(0) if b % 2 else sd[p + "pos_embed"]
        h = h_in @ sd[p + "proj_in.weight"].T + sd[p + "proj_in.bias"] + pos
        l = 0
        while f"{p}attn_blocks.{l}.mlp.norm.weight" in sd:
            q = f"{p}attn_blocks.{l}."
            n = torch.nn.functional.layer_norm(h, h.shape[-1:], sd[q + "attention.norm.weight"],
                                               sd[q + "attention.norm.bias"])
            qkv = n @ sd[q + "attention.qkv.weight"].T + sd[q + "attention.qkv.bias"]
            B, L, C3 = qkv.shape
            qq, kk, vv = qkv.split(C3 // 3, -1)
            qq, kk, vv = (t.view(B, L, heads, -1).transpose(1, 2) for t in (qq, kk, vv))
            logits = qq @ kk.transpose(-1, -2) / qq.shape[-1] ** 0.5
            logits = logits.masked_fill(sd[p + "attn_mask"] == 0, float("-inf"))
            att = (logits.softmax(-1) @ vv).transpose(1, 2).reshape(B, L, -1)
            h = h + att @ sd[q + "attention.proj.weight"].T + sd[q + "attention.proj.bias"]
            n = torch.nn.functional.layer_norm(h, h.shape[-1:], sd[q + "mlp.norm.weight"],
                                               sd[q + "mlp.norm.bias"])
            m = torch.nn.functional.gelu(n @ sd[q + "mlp.main.0.weight"].T
                                         + sd[q + "mlp.main.0.bias"])
            h = h + m @ sd[q + "mlp.main.2.weight"].T + sd[q + "mlp.main.2.bias"]
            l += 1
        out = h @ sd[p + "proj_out.weight"].T + sd[p + "proj_out.bias"]
        out = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], 1)
        a, bb = out.chunk(2, -1)
        z = (h_in - bb) * torch.exp(-a)
        total = total - a.mean((1, 2))
        tokens = z.flip(1) if b % 2 else z
    return tokens, total


def test_official_layout_loads_strict_and_gives_prescribed_outputs(tmp_path):
    model = make_model(0, std=0.1, dtype=torch.float32)  # official files hold float32
    path = _official_file(tmp_path, model)
    with pytest.raises(CheckpointError, match="head_dim"):  # no shape reveals the head width
        TarFlow.from_checkpoint(path)
    loaded = TarFlow.from_checkpoint(path, head_dim=16)
    assert loaded.config.tag == model.config.tag and loaded.config.noise_std == 0.05
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 2 - 1
    sd = {k: v.double() for k, v in torch.load(path, weights_only=True).items()}
    z_ref, logdet_ref = _hand_forward(sd, x, P=2, heads=2)
    out = loaded.double()(x)
    torch.testing.assert_close(out.z, z_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out.logdet, logdet_ref, atol=1e-12, rtol=1e-12)
    # Samples: the sequential inverse maps the reference z back to x.
    torch.testing.assert_close(loaded.reverse(z_ref), x, atol=1e-10, rtol=0)


def test_save_from_checkpoint_roundtrip_is_bit_exact(tmp_path):
    model = make_model(3, std=0.1, dtype=torch.float32)
    path = model.save_checkpoint(tmp_path / "m.pt")
    loaded = TarFlow.from_checkpoint(path)
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(loaded(x, torch.tensor([0, 1])).z, model(x, torch.tensor([0, 1])).z)
    assert not list(tmp_path.glob("*.tmp"))  # the atomic save left no temporary file


def test_lightning_style_checkpoint_loads(tmp_path):
    model = make_model(3, dtype=torch.float32)
    ckpt = {"state_dict": {f"net.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": {"model": model.config.to_dict()}, "epoch": 3}
    torch.save(ckpt, tmp_path / "last.ckpt")
    loaded = TarFlow.from_checkpoint(tmp_path / "last.ckpt")
    assert torch.equal(loaded.blocks[1].class_embed, model.blocks[1].class_embed)
    loaded = TarFlow.from_checkpoint(ckpt)  # the in-memory dict goes through the same door
    assert loaded.config == model.config


def test_wrong_architecture_names_the_keys(tmp_path):
    sd = make_model(0, dtype=torch.float32).state_dict()
    sd["blocks.0.proj_out.weight"] = torch.zeros(3, 32)
    sd["blocks.0.extra"] = torch.zeros(1)
    del sd["blocks.1.proj_in.bias"]
    with pytest.raises(CheckpointError) as err:
        TarFlow.from_checkpoint(sd, head_dim=16)
    msg = str(err.value)
    assert "blocks.1.proj_in.bias" in msg and "blocks.0.extra" in msg
    assert "blocks.0.proj_out.weight: file (3, 32) vs model (8, 32)" in msg
    with pytest.raises(CheckpointError, match="not a TarFlow state dict"):
        TarFlow.from_checkpoint({"weight": torch.zeros(2)})


def test_truncated_and_pickled_files_are_refused(tmp_path):
    path = make_model(0, dtype=torch.float32).save_checkpoint(tmp_path / "m.pt")
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        TarFlow.from_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="not found"):
        TarFlow.from_checkpoint(tmp_path / "missing.pt")

    class Payload:  # a pickle that would run code on load
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    torch.save({"x": Payload()}, tmp_path / "evil2.pt")
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(CheckpointError):
            TarFlow.from_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match="pickled Python objects") as err:
        TarFlow.from_checkpoint(tmp_path / "evil2.pt")
    assert "weights_only=False" not in str(err.value) and "GLOBAL print" in str(err.value)


@pytest.mark.parametrize("content", [bytes(range(256)) * 20, b"hello\n", b"\x80\x02garbage"],
                         ids=["random-bytes", "text", "pickle-header"])
def test_garbage_files_are_not_checkpoints(tmp_path, content):
    """Bytes that are no checkpoint at all get "not a readable checkpoint", never torch's advice
    to retry with weights_only=False (which would run whatever the file holds)."""
    path = tmp_path / "garbage.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="is not a readable checkpoint") as err:
        TarFlow.from_checkpoint(path)
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)


def test_ring_one_imports_no_framework():
    code = ("import sys, tarflow.model, tarflow.sampling, tarflow.data, tarflow.eval\n"
            "import tarflow.model.autoencoder, tarflow.model.space, tarflow.data.latents\n"
            "bad = [m for m in ('lightning', 'pytorch_lightning', 'hydra', 'omegaconf', 'wandb',"
            " 'diffusers') if m in sys.modules]\n"
            "assert not bad, bad\n"
            # diffusers (seconds to import) is loaded by the first autoencoder, not before.
            "tarflow.model.autoencoder.small_autoencoder(widths=(8,))\n"
            "bad = [m for m in ('lightning', 'hydra', 'omegaconf', 'wandb') if m in sys.modules]\n"
            "assert not bad and 'diffusers' in sys.modules, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
