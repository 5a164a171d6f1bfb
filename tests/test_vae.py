"""VAE: parity with diffusers' AutoencoderKL (PyTorch) through a diffusers directory and the LDM
single-file layout, posterior sampling and the latent scale."""

import re
import shutil

import diffusers
import jax
import numpy as np
import pytest
import torch
from flax import nnx

from catflax.models.vae import LATENT_SCALE, AutoencoderKL
from catflax.weights import diffusers_format
from catflax.weights.io import WeightFileError, write_safetensors

TINY = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=2, norm_num_groups=8, sample_size=32,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**TINY).eval()
    with torch.no_grad():  # norms start at 1/0: randomise so that mix-ups show
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    root = tmp_path_factory.mktemp("sd15")
    model.save_pretrained(root / "vae")
    images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(images.transpose(0, 3, 1, 2))).latent_dist
        latents = posterior.mean + 0.5 * posterior.std
        decoded = model.decode(latents).sample
    nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)  # noqa: E731
    expected = dict(images=images, mean=nhwc(posterior.mean), logvar=nhwc(posterior.logvar),
                    latents=nhwc(latents), decoded=nhwc(decoded))  # fmt: skip
    return model, root, expected


@nnx.jit
def encode(model, images, key):
    posterior = model.encode(images)
    return posterior.mean, posterior.logvar, model.encode_to_diffusion(images, key)


@nnx.jit
def decode(model, diffusion_latents):
    return model.decode_from_diffusion(diffusion_latents)


def check_parity(model: AutoencoderKL, expected: dict, label: str) -> None:
    key = jax.random.key(7)
    mean, logvar, scaled = encode(model, expected["images"], key)
    errors = {
        "mean": np.abs(np.asarray(mean) - expected["mean"]).max(),
        "logvar": np.abs(np.asarray(logvar) - expected["logvar"]).max(),
    }
    # decode_from_diffusion divides by the latent scale before decoding.
    decoded = decode(model, LATENT_SCALE * expected["latents"])
    errors["decode"] = np.abs(np.asarray(decoded) - expected["decoded"]).max()
    print(f"VAE vs diffusers ({label}): max abs errors " + ", ".join(
        f"{k} {v:.2e}" for k, v in errors.items()))  # fmt: skip
    assert max(errors.values()) < 1e-4, errors
    # encode_to_diffusion = 0.18215 * (mean + std * N(0,1)) with the noise from `key`.
    noise = jax.random.normal(key, mean.shape)
    np.testing.assert_allclose(scaled, 0.18215 * (mean + np.exp(0.5 * logvar) * noise), atol=1e-6)


def test_vae_matches_diffusers_directory(tiny_vae):
    _, root, expected = tiny_vae
    ours = AutoencoderKL.from_pretrained(str(root))
    assert ours.config.block_out_channels == (16, 32, 32) and ours.config.norm_num_groups == 8
    assert ours.config.scaling_factor == LATENT_SCALE == 0.18215
    check_parity(ours, expected, "directory")


def diffusers_vae_to_ldm(state: dict, levels: int) -> dict:
    """diffusers AutoencoderKL names -> LDM `first_stage_model.*` names, written independently
    of catflax.weights.ldm (regex per rule, decoder levels numbered from the top)."""
    rules = [
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_([qkv])\.", r"\1.mid.attn_1.\2."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
    ]
    out = {}
    for key, value in state.items():
        new = key
        for pattern, replacement in rules:
            new = re.sub(pattern, replacement, new)
        up = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)$", new)
        if up:
            level = levels - 1 - int(up[1])
            inner = f"block.{up[3]}" if up[2] == "resnets" else "upsample"
            new = f"decoder.up.{level}.{inner}.{up[4]}"
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", new):
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convs
        out["first_stage_model." + new] = value
    return out


def test_vae_from_ldm_single_file_and_old_names(tiny_vae, tmp_path):
    torch_model, root, expected = tiny_vae
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    ldm_state = diffusers_vae_to_ldm(state, levels=3)
    assert "first_stage_model.decoder.up.2.upsample.conv.weight" in ldm_state
    ldm_state["model.diffusion_model.out.2.bias"] = np.zeros(4, np.float32)  # other parts
    write_safetensors(str(tmp_path / "sd.safetensors"), ldm_state)
    cfg = diffusers_format.vae_config_from_diffusers(dict(TINY))
    ours, report = AutoencoderKL.from_pretrained(
        str(tmp_path / "sd.safetensors"), config=cfg, output_loading_info=True
    )
    assert len(report.loaded) == len(state) and not report.initialised
    check_parity(ours, expected, "LDM single file")

    # diffusers before 0.14 named the mid attention query/key/value/proj_attn.
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for key, value in state.items():
        for new, legacy in old_names.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{legacy}.")
        old[key] = value
    (tmp_path / "old").mkdir()
    write_safetensors(str(tmp_path / "old" / "diffusion_pytorch_model.safetensors"), old)
    shutil.copy(root / "vae" / "config.json", tmp_path / "old" / "config.json")
    check_parity(AutoencoderKL.from_pretrained(str(tmp_path / "old")), expected, "legacy names")


def test_unsupported_vae_configs_are_clear_errors():
    with pytest.raises(WeightFileError, match="shift_factor=0.1 is not supported"):
        diffusers_format.vae_config_from_diffusers({**TINY, "shift_factor": 0.1})
    with pytest.raises(WeightFileError, match="down_block_types"):
        diffusers_format.vae_config_from_diffusers({**TINY, "down_block_types": ["X"] * 3})
