"""LDM single-file checkpoints (SD-1.5-inpainting `.ckpt`/`.safetensors`) and the official
CAT-Diffusion checkpoint, which is the LDM layout plus the adapter, the inpainter and CLIP vision.

| prefix in the file              | component            | names inside                            |
|---------------------------------|----------------------|-----------------------------------------|
| `model.diffusion_model.`        | UNet                 | LDM openaimodel (`input_blocks.1.0...`) |
| `first_stage_model.`            | VAE                  | LDM (`encoder.down.0.block.0...`)       |
| `cond_stage_model.transformer.` | CLIP text            | transformers (`text_model...`)          |
| `cond_stage_model2.encoder.`    | CLIP vision (CAT)    | transformers (`vision_model...`)        |
| `fusion_model.`                 | semantic inpainter   | see catflax.models.inpainter            |

CAT checkpoints' UNet transformer blocks also have `attn3`/`norm4`: our `ref_attn`/`ref_norm`.

Everything else (noise-schedule buffers, EMA copies) is reported as ignored. Loading renames our
diffusers-style names to LDM ones (`unet_ldm_name`, `vae_ldm_name`), so it stays strict.
`reference_state_dict` writes a CATDiffusion back in this layout, with the DDPM buffers
(`catflax.export --format=reference`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from catflax.models import clip
from catflax.models.rngs import abstract_module
from catflax.models.unet import CAT_UNET, UNet, UNetConfig
from catflax.models.vae import SD15_VAE, AutoencoderKL, VAEConfig
from catflax.weights import convert, io

COMPONENT_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "clip_text": "cond_stage_model.transformer.",
    "clip_vision": "cond_stage_model2.encoder.",
    "fusion_model": "fusion_model.",
}
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_ADAPTER = {"ref_attn": "attn3", "ref_norm": "norm4"}  # ours -> the reference's
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def read_checkpoint(path: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """The flat state dict of a single-file checkpoint (`.ckpt` needs allow_pickle and torch)."""
    return io.read_state_dict(path, allow_pickle=allow_pickle)


def split_checkpoint(state: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{component: state with its prefix removed} for COMPONENT_PREFIXES, plus "other"."""
    parts: dict[str, dict[str, Any]] = {name: {} for name in [*COMPONENT_PREFIXES, "other"]}
    for key, value in state.items():
        name = next((n for n, p in COMPONENT_PREFIXES.items() if key.startswith(p)), "other")
        parts[name][key[len(COMPONENT_PREFIXES.get(name, "")) :]] = value
    return parts


# ---------------------------------------------------------------------------------------------
# Name mapping: ours (= diffusers) -> LDM
# ---------------------------------------------------------------------------------------------


def unet_ldm_name(key: str, cfg: UNetConfig) -> str:
    """The LDM (CAT for the adapter) name of a diffusers-style UNet parameter name."""
    p, per_level = key.split("."), cfg.layers_per_block + 1
    if p[0] == "conv_in":
        return ".".join(["input_blocks.0.0", *p[1:]])
    if p[0] == "time_embedding":
        return ".".join([{"linear_1": "time_embed.0", "linear_2": "time_embed.2"}[p[1]], *p[2:]])
    if p[0] in ("conv_norm_out", "conv_out"):
        return ".".join([{"conv_norm_out": "out.0", "conv_out": "out.2"}[p[0]], *p[1:]])
    if p[0] == "mid_block":
        index = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(p[1], p[2])]
        return _inner(f"middle_block.{index}", p[1], p[3:])
    level, kind, j, rest = int(p[1]), p[2], int(p[3]), p[4:]
    if p[0] == "down_blocks":
        if kind == "downsamplers":  # p[4] == "conv"
            return ".".join([f"input_blocks.{(level + 1) * per_level}.0.op", *rest[1:]])
        block = 1 + level * per_level + j
        return _inner(f"input_blocks.{block}.{0 if kind == 'resnets' else 1}", kind, rest)
    if p[0] == "up_blocks":
        if kind == "upsamplers":
            has_attention = cfg.attention_levels[::-1][level]
            block = level * per_level + per_level - 1
            return ".".join([f"output_blocks.{block}.{2 if has_attention else 1}", *rest])
        block = level * per_level + j
        return _inner(f"output_blocks.{block}.{0 if kind == 'resnets' else 1}", kind, rest)
    raise KeyError(f"no LDM name for UNet parameter {key!r}")


def _inner(prefix: str, kind: str, rest: list[str]) -> str:
    if kind == "resnets":
        rest = [_RESNET[rest[0]], *rest[1:]]
    else:  # a transformer: the same names, but the adapter's
        rest = [_ADAPTER.get(part, part) for part in rest]
    return ".".join([prefix, *rest])


def vae_ldm_name(key: str, cfg: VAEConfig) -> str:
    """The LDM name of a diffusers-style AutoencoderKL parameter name."""
    p = key.split(".")
    if p[0] in ("quant_conv", "post_quant_conv") or p[1] in ("conv_in", "conv_out"):
        return key
    if p[1] == "conv_norm_out":
        return ".".join([p[0], "norm_out", *p[2:]])
    if p[1] == "mid_block":
        if p[2] == "attentions":  # to_out.0.weight -> proj_out.weight
            rest = [_VAE_ATTENTION[p[4]], *p[(6 if p[4] == "to_out" else 5) :]]
            return ".".join([p[0], "mid.attn_1", *rest])
        return ".".join([p[0], f"mid.block_{int(p[3]) + 1}", *_vae_resnet(p[4:])])
    level = int(p[2])
    if p[1] == "up_blocks":  # LDM numbers decoder levels from the highest resolution
        level = len(cfg.block_out_channels) - 1 - level
    stage = {"down_blocks": "down", "up_blocks": "up"}[p[1]]
    if p[3] in ("downsamplers", "upsamplers"):
        return ".".join([p[0], stage, str(level), p[3][:-2], *p[5:]])  # ...downsample.conv.weight
    return ".".join([p[0], stage, str(level), "block", p[4], *_vae_resnet(p[5:])])


def _vae_resnet(rest: list[str]) -> list[str]:
    return ["nin_shortcut" if rest[0] == "conv_shortcut" else rest[0], *rest[1:]]


def _prefixed(rename: Callable[[str], str], prefix: str) -> Callable[[str], str]:
    return lambda key: prefix + rename(key)


def _find_prefix(state: Mapping[str, Any], component: str, bare_marker: str, diffusers_marker: str):
    """(prefix, naming) of a component in a file: full checkpoint, bare LDM, or diffusers names."""
    prefix = COMPONENT_PREFIXES[component]
    for marker, found, naming in (
        (prefix, prefix, "ldm"), (bare_marker, "", "ldm"), (diffusers_marker, "", "diffusers"),
    ):  # fmt: skip
        if any(k.startswith(marker) for k in state):
            return found, naming
    return None, None


def _component_state(state, prefix: str, naming: str) -> dict[str, Any]:
    if naming == "ldm" and prefix:
        return {k: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------


def _read(source, allow_pickle: bool, source_name: str | None):
    if isinstance(source, str):
        return read_checkpoint(source, allow_pickle), source_name or source
    return source, source_name or "state dict"


def load_unet(
    source: str | Mapping[str, Any], cfg: UNetConfig, *, allow_pickle: bool = False,
    init_missing_adapter: bool = False, seed: int = 0, place=None, source_name: str | None = None,
):  # fmt: skip
    """(UNet, LoadReport) from an LDM/CAT checkpoint file or its already-read state dict."""
    state, name = _read(source, allow_pickle, source_name)
    prefix, naming = _find_prefix(state, "unet", "input_blocks.", "down_blocks.")
    if prefix is None:
        raise io.WeightFileError(
            f"{name}: no UNet weights (looked for keys starting with "
            f"{COMPONENT_PREFIXES['unet']!r}, 'input_blocks.' or 'down_blocks.')"
        )
    rename = None
    if naming == "ldm":
        rename = _prefixed(lambda k: unet_ldm_name(k, cfg), prefix)
    return UNet.from_state_dict(
        cfg, _component_state(state, prefix, naming), source_name=name, rename=rename,
        init_missing_adapter=init_missing_adapter, seed=seed, place=place,
    )  # fmt: skip


def load_vae(
    source: str | Mapping[str, Any], cfg: VAEConfig, *, allow_pickle: bool = False, place=None,
    source_name: str | None = None,
):  # fmt: skip
    """(AutoencoderKL, LoadReport) from an LDM/CAT checkpoint, a bare LDM VAE file, a state dict."""
    from catflax.weights.diffusers_format import rename_deprecated_attention

    state, name = _read(source, allow_pickle, source_name)
    prefix, naming = _find_prefix(state, "vae", "encoder.down.", "encoder.down_blocks.")
    if prefix is None:
        raise io.WeightFileError(
            f"{name}: no VAE weights (looked for keys starting with "
            f"{COMPONENT_PREFIXES['vae']!r}, 'encoder.down.' or 'encoder.down_blocks.')"
        )
    state = _component_state(state, prefix, naming)
    if naming == "diffusers":
        state, rename = rename_deprecated_attention(state), None
    else:  # training-time VAE files also hold the LPIPS/discriminator loss (`loss.*`)
        state = {k: _squeeze_attention(k, v) for k, v in state.items()
                 if not k.startswith(prefix + "loss.")}  # fmt: skip
        rename = _prefixed(lambda k: vae_ldm_name(k, cfg), prefix)
    return AutoencoderKL.from_state_dict(cfg, state, source_name=name, rename=rename, place=place)


def _squeeze_attention(key: str, value):
    """LDM's VAE attention projections are 1x1 convs (C,C,1,1); ours are linear (C,C)."""
    if ".mid.attn_1." in key and key.endswith(".weight") and np.ndim(value) == 4:
        return np.asarray(value)[:, :, 0, 0]
    return value


def _tower(part: dict[str, Any], prefix: str) -> dict[str, Any]:
    """transformers 4 (the reference's) nests a tower under `text_model.`/`vision_model.` and
    saves the `position_ids` buffer; transformers 5 does neither. Accept both."""
    part = {k: v for k, v in part.items() if not k.endswith("embeddings.position_ids")}
    if not any(k.startswith(prefix) for k in part):
        part = {prefix + k: v for k, v in part.items()}
    return part


def load_clip_text(
    state: Mapping[str, Any], cfg: clip.CLIPTextConfig = clip.CLIP_VIT_L14_TEXT, *,
    source_name: str = "state dict", place=None,
) -> clip.CLIPTextModel:  # fmt: skip
    """The CLIP text tower from a checkpoint's `cond_stage_model.transformer.*` keys."""
    part = _tower(split_checkpoint(state)["clip_text"], "text_model.")
    abstract = abstract_module(lambda rngs: clip.CLIPTextModel(cfg, rngs=rngs))
    model, _ = convert.load_state_dict(
        abstract, part, source_name=f"{source_name} [cond_stage_model.transformer]", place=place
    )
    return model


def load_clip_vision(
    state: Mapping[str, Any], cfg: clip.CLIPVisionConfig = clip.CLIP_VIT_L14_VISION, *,
    source_name: str = "state dict", place=None,
) -> clip.CLIPVisionModel:  # fmt: skip
    """The CLIP vision tower (the teacher) from a CAT checkpoint's `cond_stage_model2.encoder.*`."""
    part = _tower(split_checkpoint(state)["clip_vision"], "vision_model.")
    abstract = abstract_module(lambda rngs: clip.CLIPVisionModel(cfg, rngs=rngs))
    model, _ = convert.load_state_dict(
        abstract, part, source_name=f"{source_name} [cond_stage_model2.encoder]", place=place,
        rename=lambda k: k.replace("pre_layernorm", "pre_layrnorm"),  # transformers' spelling
    )  # fmt: skip
    return model


@dataclasses.dataclass
class CATCheckpoint:
    """The pieces of an official CAT-Diffusion checkpoint, loaded; `fusion_model` as the loader
    given for it returned it (the raw state dict without one); `ignored` lists unused keys."""

    unet: UNet
    vae: AutoencoderKL
    clip_text: clip.CLIPTextModel
    clip_vision: clip.CLIPVisionModel
    fusion_model: Any
    ignored: list[str]


def load_cat_checkpoint(
    path: str, *, unet: UNetConfig = CAT_UNET, vae: VAEConfig = SD15_VAE,
    clip_text: clip.CLIPTextConfig = clip.CLIP_VIT_L14_TEXT,
    clip_vision: clip.CLIPVisionConfig = clip.CLIP_VIT_L14_VISION,
    fusion_loader: Callable[[dict[str, Any]], Any] | None = None, allow_pickle: bool = False,
    place=None,
) -> CATCheckpoint:  # fmt: skip
    """Reads an official CAT-Diffusion checkpoint once and builds every component from it.

    `fusion_loader` receives the `fusion_model.*` state dict (prefix removed), e.g. the semantic
    inpainter's loader; the adapter must be present (`unet.ref_adapter` True).
    """
    state = read_checkpoint(path, allow_pickle)
    parts = split_checkpoint(state)
    if not parts["fusion_model"]:
        raise io.WeightFileError(f"{path}: not a CAT-Diffusion checkpoint (no fusion_model.* keys)")
    fusion = fusion_loader(parts["fusion_model"]) if fusion_loader else parts["fusion_model"]
    return CATCheckpoint(
        unet=load_unet(state, unet, place=place, source_name=path)[0],
        vae=load_vae(state, vae, place=place, source_name=path)[0],
        clip_text=load_clip_text(state, clip_text, source_name=path, place=place),
        clip_vision=load_clip_vision(state, clip_vision, source_name=path, place=place),
        fusion_model=fusion,
        ignored=sorted(parts["other"]),
    )


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def unet_to_ldm(model: UNet, prefix: str = COMPONENT_PREFIXES["unet"]) -> dict[str, np.ndarray]:
    """The UNet as an LDM/CAT state dict (the adapter as attn3/norm4)."""
    return convert.export_state_dict(model, lambda k: prefix + unet_ldm_name(k, model.config))


def vae_to_ldm(
    model: AutoencoderKL, prefix: str = COMPONENT_PREFIXES["vae"]
) -> dict[str, np.ndarray]:
    """The VAE as an LDM state dict (attention projections as 1x1 convs)."""
    out = convert.export_state_dict(model, lambda k: prefix + vae_ldm_name(k, model.config))
    return {
        k: v[:, :, None, None] if ".mid.attn_1." in k and v.ndim == 2 else v for k, v in out.items()
    }


def reference_state_dict(model, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Every parameter under the official CAT-Diffusion / LDM names, plus the DDPM buffers."""
    prefixes = COMPONENT_PREFIXES
    out = {**unet_to_ldm(model.unet), **vae_to_ldm(model.vae)}
    out.update(convert.export_state_dict(model.clip_text, lambda k: prefixes["clip_text"] + k))
    out.update(convert.export_state_dict(
        model.clip_vision,
        lambda k: prefixes["clip_vision"] + k.replace("pre_layernorm", "pre_layrnorm"),
    ))  # fmt: skip
    out.update(model.inpainter.state_dict(prefix=prefixes["fusion_model"]))
    return {**io.cast_floats(out, dtype), **ddpm_buffers()}


def ddpm_buffers() -> dict[str, np.ndarray]:
    """LDM's DDPM.register_schedule buffers (float32) for SPEC.md §5's schedule."""
    from catflax.diffusion import scaled_linear_betas

    betas = scaled_linear_betas()
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
    buffers = dict(
        betas=betas, alphas_cumprod=abar, alphas_cumprod_prev=abar_prev,
        sqrt_alphas_cumprod=np.sqrt(abar), sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
        log_one_minus_alphas_cumprod=np.log(1.0 - abar),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar - 1), posterior_variance=posterior_variance,
        posterior_log_variance_clipped=np.log(np.maximum(posterior_variance, 1e-20)),
        posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
        posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
    )  # fmt: skip
    return {k: v.astype(np.float32) for k, v in buffers.items()}
