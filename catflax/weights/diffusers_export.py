"""A CATDiffusion as diffusers / transformers directories (the `diffusers` export format).

unet/            config.json (UNet2DConditionModel) + diffusion_pytorch_model.safetensors,
                 without the reference adapter: diffusers' own class loads it as is
vae/             config.json (AutoencoderKL) + diffusion_pytorch_model.safetensors
text_encoder/    config.json (transformers CLIPTextModel) + model.safetensors
image_encoder/   config.json (transformers CLIPVisionModel) + model.safetensors (the teacher)
tokenizer/       a transformers CLIPTokenizer directory
scheduler/       scheduler_config.json (DDIMScheduler as SPEC.md §6 samples)
unet_adapter.safetensors   ref_attn/ref_norm of every transformer block, diffusers-style
                           names (`down_blocks.0.attentions.0.transformer_blocks.0.ref_attn...`)
inpainter.safetensors      the semantic inpainter, the reference's fusion_model names
cat_config.json            every part's catflax config, resolution and sampling defaults
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from catflax.models.unet import UNetConfig, is_adapter_param
from catflax.models.vae import VAEConfig

FORMAT, FORMAT_VERSION = "catflax-diffusers", 1
ADAPTER_FILE, INPAINTER_FILE, CONFIG_FILE = (
    "unet_adapter.safetensors", "inpainter.safetensors", "cat_config.json",
)  # fmt: skip
FOLDERS = ("unet", "vae", "text_encoder", "image_encoder", "tokenizer", "scheduler")
ENTRIES = (*FOLDERS, ADAPTER_FILE, INPAINTER_FILE, CONFIG_FILE)  # what `out` holds: nothing else
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"
_DIFFUSERS_VERSION = "0.30.0"  # the oldest diffusers whose config layout this is


def unet_config_to_diffusers(cfg: UNetConfig, sample_size: int) -> dict[str, Any]:
    """diffusers UNet2DConditionModel config.json of our UNetConfig (the adapter left out)."""
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in cfg.attention_levels[::-1]]
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": _DIFFUSERS_VERSION,
        "sample_size": sample_size, "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels, "center_input_sample": False,
        "flip_sin_to_cos": cfg.flip_sin_to_cos, "freq_shift": cfg.freq_shift,
        "down_block_types": down, "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": up, "only_cross_attention": False,
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block, "downsample_padding": 1,
        "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": cfg.norm_num_groups,
        "norm_eps": cfg.norm_eps, "cross_attention_dim": cfg.cross_attention_dim,
        "transformer_layers_per_block": cfg.transformer_layers_per_block,
        # diffusers' historical name: with num_attention_heads unset it is the head count
        "attention_head_dim": cfg.num_heads, "use_linear_projection": cfg.use_linear_projection,
        "upcast_attention": False, "resnet_time_scale_shift": "default",
    }  # fmt: skip


def vae_config_to_diffusers(cfg: VAEConfig, sample_size: int) -> dict[str, Any]:
    """diffusers AutoencoderKL config.json of our VAEConfig."""
    n = len(cfg.block_out_channels)
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": _DIFFUSERS_VERSION,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block, "act_fn": "silu",
        "latent_channels": cfg.latent_channels, "norm_num_groups": cfg.norm_num_groups,
        "sample_size": sample_size, "scaling_factor": cfg.scaling_factor,
        "mid_block_add_attention": cfg.mid_block_add_attention,
        "use_quant_conv": cfg.use_quant_conv, "use_post_quant_conv": cfg.use_post_quant_conv,
        "force_upcast": True,
    }  # fmt: skip


def ddim_scheduler_config() -> dict[str, Any]:
    """diffusers DDIMScheduler config that samples as catflax.diffusion does (SD-1.5's)."""
    from catflax.diffusion import SD15_SCHEDULE as s

    return {
        "_class_name": "DDIMScheduler", "_diffusers_version": _DIFFUSERS_VERSION,
        "num_train_timesteps": s.num_train_steps, "beta_start": s.beta_start,
        "beta_end": s.beta_end, "beta_schedule": "scaled_linear", "clip_sample": False,
        "set_alpha_to_one": False, "steps_offset": s.steps_offset, "prediction_type": "epsilon",
        "timestep_spacing": "leading",
    }  # fmt: skip


def text_config_to_transformers(cfg, tokenizer=None, dtype: str = "float32") -> dict[str, Any]:
    """transformers CLIPTextModel config.json of our CLIPTextConfig."""
    ids = {"eos_token_id": cfg.eos_token_id}
    if tokenizer is not None:
        ids.update(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "max_position_embeddings": cfg.max_positions,
        "hidden_act": cfg.hidden_act, "layer_norm_eps": cfg.layer_norm_eps, "dtype": dtype, **ids,
    }  # fmt: skip


def vision_config_to_transformers(cfg, dtype: str = "float32") -> dict[str, Any]:
    """transformers CLIPVisionModel config.json of our CLIPVisionConfig."""
    return {
        "architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model",
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "image_size": cfg.image_size, "patch_size": cfg.patch_size,
        "num_channels": cfg.num_channels, "hidden_act": cfg.hidden_act,
        "layer_norm_eps": cfg.layer_norm_eps, "dtype": dtype,
    }  # fmt: skip


def split_adapter(unet_state: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """(the UNet without the adapter, the adapter's tensors) of a diffusers-style state dict."""
    base = {k: v for k, v in unet_state.items() if not is_adapter_param(k)}
    return base, {k: v for k, v in unet_state.items() if is_adapter_param(k)}


def _write_dir(path: str, config_name: str, config: dict, weights_name="", tensors=None) -> None:
    from catflax.weights import io

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, config_name), "w") as f:
        json.dump(config, f, indent=2)
    if tensors:
        io.write_safetensors(os.path.join(path, weights_name), tensors, metadata={"format": "pt"})


def write_diffusers_dirs(model, out: str, *, tokenizer, resolution: int, sampling, dtype: str):
    """Writes the layout of the module docstring for a CATDiffusion `model` to `out`."""
    from catflax.weights import convert, io

    cfg = model.config
    latent_size = resolution // cfg.vae.downsampling_factor

    def export(module, rename=None):
        return io.cast_floats(convert.export_state_dict(module, rename), dtype)

    unet, adapter = split_adapter(export(model.unet))
    vision_rename = lambda k: k.replace("pre_layernorm", "pre_layrnorm")  # noqa: E731
    directories = (  # (folder, config, weights file, tensors)
        ("unet", unet_config_to_diffusers(cfg.unet, latent_size), DIFFUSERS_WEIGHTS,
         unet),
        ("vae", vae_config_to_diffusers(cfg.vae, resolution), DIFFUSERS_WEIGHTS,
         export(model.vae)),
        ("text_encoder", text_config_to_transformers(cfg.clip_text, tokenizer, dtype),
         TRANSFORMERS_WEIGHTS, export(model.clip_text)),
        ("image_encoder", vision_config_to_transformers(cfg.clip_vision, dtype),
         TRANSFORMERS_WEIGHTS, export(model.clip_vision, vision_rename)),
    )  # fmt: skip
    for folder, config, weights_name, tensors in directories:
        _write_dir(os.path.join(out, folder), "config.json", config, weights_name, tensors)
    _write_dir(os.path.join(out, "scheduler"), "scheduler_config.json", ddim_scheduler_config())
    tokenizer.save_pretrained(os.path.join(out, "tokenizer"))
    if adapter:
        io.write_safetensors(os.path.join(out, ADAPTER_FILE), adapter)
    io.write_safetensors(os.path.join(out, INPAINTER_FILE),
                         io.cast_floats(model.inpainter.state_dict(prefix=""), dtype))  # fmt: skip
    parts = ("clip_text", "clip_vision", "vae", "unet", "inpainter")
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": {p: {**dataclasses.asdict(getattr(cfg, p)), "param_dtype": dtype} for p in parts},
        "resolution": resolution, "sampling": dict(sampling),
        "files": {"adapter": ADAPTER_FILE if adapter else None, "inpainter": INPAINTER_FILE},
    }  # fmt: skip
    with open(os.path.join(out, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2)


def load_unet_with_adapter(out: str):
    """Our UNet (with the adapter) from a `diffusers` export: unet/ + unet_adapter.safetensors,
    sizes from cat_config.json."""
    from catflax.models.unet import UNet
    from catflax.weights import io

    cfg = UNetConfig(**io.read_json(os.path.join(out, CONFIG_FILE))["model"]["unet"])
    state = io.read_state_dict(os.path.join(out, "unet"))
    if cfg.ref_adapter:
        state.update(io.read_safetensors(os.path.join(out, ADAPTER_FILE)))
    return UNet.from_state_dict(cfg, state, source_name=out)[0]
