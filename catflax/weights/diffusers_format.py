"""diffusers model directories (`unet/`, `vae/`: config.json + safetensors) -> our UNet and VAE.

Our module trees mirror diffusers', so state-dict names need no renaming; this module maps the
config fields and refuses configs that describe something our modules do not compute.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from typing import Any

from catflax.models.unet import UNet, UNetConfig
from catflax.models.vae import AutoencoderKL, VAEConfig
from catflax.weights import io

# Fields our configs take from diffusers' config.json; the rest are run-time choices.
RUNTIME_FIELDS = (
    "dtype", "param_dtype", "attention", "remat", "remat_policy", "ref_adapter", "ref_dim"
)  # fmt: skip

# diffusers' own defaults, for the fields old config.json files leave out.
_UNET_DEFAULTS = dict(
    in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    mid_block_type="UNetMidBlock2DCrossAttn", attention_head_dim=8, num_attention_heads=None,
    cross_attention_dim=1280, transformer_layers_per_block=1, norm_num_groups=32, norm_eps=1e-5,
    use_linear_projection=False, flip_sin_to_cos=True, freq_shift=0,
)  # fmt: skip
# Options we do not implement: the value each must have (diffusers' default).
_UNET_FIXED = dict(
    center_input_sample=False, only_cross_attention=False, downsample_padding=1,
    mid_block_scale_factor=1, act_fn="silu", encoder_hid_dim=None, encoder_hid_dim_type=None,
    dual_cross_attention=False, class_embed_type=None, addition_embed_type=None,
    num_class_embeds=None, resnet_time_scale_shift="default", resnet_skip_time_act=False,
    resnet_out_scale_factor=1.0, time_embedding_type="positional", time_embedding_dim=None,
    time_embedding_act_fn=None, timestep_post_act=None, time_cond_proj_dim=None, conv_in_kernel=3,
    conv_out_kernel=3, attention_type="default", class_embeddings_concat=False,
    cross_attention_norm=None, reverse_transformer_layers_per_block=None,
    projection_class_embeddings_input_dim=None, addition_time_embed_dim=None,
)  # fmt: skip
_VAE_DEFAULTS = dict(
    in_channels=3, out_channels=3, block_out_channels=[64], layers_per_block=1, latent_channels=4,
    norm_num_groups=32, scaling_factor=0.18215, mid_block_add_attention=True, use_quant_conv=True,
    use_post_quant_conv=True,
)  # fmt: skip
_VAE_FIXED = dict(act_fn="silu", shift_factor=None, latents_mean=None, latents_std=None)
# Attention names that diffusers versions before 0.14 wrote for the VAE's mid attention.
_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


_COMPONENT_CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}


def component_dir(path: str, component: str) -> str:
    """`path/component` for a pipeline root, else `path` itself when it holds config.json (of
    the component's diffusers class, where the config names one)."""
    sub = os.path.join(path, component)
    if os.path.isfile(os.path.join(sub, "config.json")):
        return sub
    config = os.path.join(path, "config.json")
    if os.path.isfile(config):
        found, expected = io.read_json(config).get("_class_name"), _COMPONENT_CLASSES[component]
        if found and found != expected:
            raise io.WeightFileError(
                f"{config}: a {found} config where the {component} ({expected}) was expected; "
                f"name the pipeline root (with {component}/ in it) or the {component}/ folder"
            )
        return path
    raise io.WeightFileError(
        f"{path}: not a diffusers directory (no config.json in it or in {component}/)"
    )


def _one(value: Any, field: str, source: str) -> Any:
    """A per-block diffusers value that must be the same for every block."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise io.WeightFileError(f"{source}: {field}={value} differs per block; unsupported")
        return value[0]
    return value


def _check_fixed(hf: dict, fixed: dict, source: str) -> None:
    for field, want in fixed.items():
        if hf.get(field, want) != want:
            raise io.WeightFileError(
                f"{source}: {field}={hf[field]!r} is not supported (only {want!r})"
            )


def _apply_overrides(cfg, overrides: dict, source: str, free: Iterable[str] = ()):
    """Run-time fields and `free` ones (settings that are not sizes) override the file's value;
    a size field may only repeat what the file says."""
    not_sizes = {*RUNTIME_FIELDS, *free}
    fields = [f.name for f in dataclasses.fields(cfg)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise TypeError(
            f"{source}: unknown option(s) {unknown} for {type(cfg).__name__}; it takes {fields}"
        )
    for field, value in overrides.items():
        if field not in not_sizes and getattr(cfg, field) != value:
            raise io.WeightFileError(
                f"{source}: {field} is {getattr(cfg, field)!r} in the file, but {value!r} was "
                "asked for"
                + (" (SD-1.5-inpainting takes 9: 4 noisy latents + 1 mask + 4 masked-image "
                   "latents)" if field == "in_channels" else "")
            )  # fmt: skip
    return dataclasses.replace(cfg, **overrides)


def unet_config_from_diffusers(
    hf: dict[str, Any], source: str = "config.json", **overrides
) -> UNetConfig:
    """Our UNetConfig from a diffusers UNet2DConditionModel config.json dict."""
    hf = {**_UNET_DEFAULTS, **hf}
    _check_fixed(hf, _UNET_FIXED, source)
    down, up = list(hf["down_block_types"]), list(hf["up_block_types"])
    known = {"CrossAttnDownBlock2D", "DownBlock2D"}
    if not set(down) <= known or hf["mid_block_type"] != "UNetMidBlock2DCrossAttn":
        raise io.WeightFileError(
            f"{source}: block types {down} / {hf['mid_block_type']} not supported "
            f"(down blocks: {sorted(known)}; mid block: UNetMidBlock2DCrossAttn)"
        )
    levels = tuple(t == "CrossAttnDownBlock2D" for t in down)
    mirrored = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in levels[::-1]]
    if up != mirrored:
        raise io.WeightFileError(f"{source}: up_block_types {up} do not mirror {down}")
    # diffusers' `attention_head_dim` is historically the number of heads.
    heads = hf["num_attention_heads"] or hf["attention_head_dim"]
    cfg = UNetConfig(
        in_channels=hf["in_channels"],
        out_channels=hf["out_channels"],
        block_out_channels=tuple(hf["block_out_channels"]),
        attention_levels=levels,
        layers_per_block=_one(hf["layers_per_block"], "layers_per_block", source),
        num_heads=_one(heads, "attention_head_dim", source),
        transformer_layers_per_block=_one(
            hf["transformer_layers_per_block"], "transformer_layers_per_block", source
        ),
        cross_attention_dim=_one(hf["cross_attention_dim"], "cross_attention_dim", source),
        norm_num_groups=hf["norm_num_groups"],
        norm_eps=hf["norm_eps"],
        use_linear_projection=hf["use_linear_projection"],
        flip_sin_to_cos=hf["flip_sin_to_cos"],
        freq_shift=hf["freq_shift"],
    )
    return _apply_overrides(cfg, overrides, source)


def vae_config_from_diffusers(
    hf: dict[str, Any], source: str = "config.json", **overrides
) -> VAEConfig:
    """Our VAEConfig from a diffusers AutoencoderKL config.json dict."""
    hf = {**_VAE_DEFAULTS, **hf}
    _check_fixed(hf, _VAE_FIXED, source)
    n = len(hf["block_out_channels"])
    want = dict(
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n
    )
    for field, types in want.items():
        if list(hf.get(field, types)) != types:
            raise io.WeightFileError(f"{source}: {field}={hf[field]} not supported (only {types})")
    cfg = VAEConfig(
        in_channels=hf["in_channels"],
        out_channels=hf["out_channels"],
        latent_channels=hf["latent_channels"],
        block_out_channels=tuple(hf["block_out_channels"]),
        layers_per_block=hf["layers_per_block"],
        norm_num_groups=hf["norm_num_groups"],
        mid_block_add_attention=hf["mid_block_add_attention"],
        use_quant_conv=hf["use_quant_conv"],
        use_post_quant_conv=hf["use_post_quant_conv"],
        scaling_factor=hf["scaling_factor"],
    )
    return _apply_overrides(cfg, overrides, source)


def rename_deprecated_attention(state: dict[str, Any]) -> dict[str, Any]:
    """Maps old diffusers VAE attention names (query/key/value/proj_attn) to today's."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) > 2 and "attentions" in parts and parts[-2] in _DEPRECATED_ATTENTION:
            key = ".".join([*parts[:-2], _DEPRECATED_ATTENTION[parts[-2]], parts[-1]])
        out[key] = value
    return out


def load_unet(
    path: str, *, allow_pickle: bool = False, init_missing_adapter: bool = False, seed: int = 0,
    place=None, variant: str | None = None, **overrides,
):  # fmt: skip
    """(UNet, LoadReport) from a diffusers pipeline root or its `unet/` directory (`variant`:
    e.g. "fp16" for diffusion_pytorch_model.fp16.safetensors)."""
    directory = component_dir(path, "unet")
    config_path = os.path.join(directory, "config.json")
    cfg = unet_config_from_diffusers(io.read_json(config_path), config_path, **overrides)
    state = io.read_state_dict(directory, allow_pickle=allow_pickle, variant=variant)
    return UNet.from_state_dict(
        cfg, state, source_name=directory, init_missing_adapter=init_missing_adapter, seed=seed,
        place=place,
    )  # fmt: skip


def load_vae(
    path: str, *, allow_pickle: bool = False, place=None, variant: str | None = None, **overrides
):
    """(AutoencoderKL, LoadReport) from a diffusers pipeline root or its `vae/` directory."""
    directory = component_dir(path, "vae")
    config_path = os.path.join(directory, "config.json")
    cfg = vae_config_from_diffusers(io.read_json(config_path), config_path, **overrides)
    state = io.read_state_dict(directory, allow_pickle=allow_pickle, variant=variant)
    state = rename_deprecated_attention(state)
    return AutoencoderKL.from_state_dict(cfg, state, source_name=directory, place=place)
