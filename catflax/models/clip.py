"""Frozen CLIP text and vision towers, matching transformers' CLIPTextModel / CLIPVisionModel.

Module and parameter names mirror transformers so its state dicts map one to one
(`text_model.encoder.layers.N.self_attn.q_proj`, ...). Images are NHWC.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from catflax.models.attention import dot_product_attention
from catflax.models.layers import activation, layer_norm, remat, remat_mode, torch_linear
from catflax.models.rngs import abstract_module


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Sizes of the text tower; defaults are ViT-L/14 (`openai/clip-vit-large-patch14`)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_positions: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    attention: str = "xla"  # xla | cudnn | chunked | splash (TPU)
    remat: bool = False
    remat_policy: str = "full"  # with remat: "full" | "dots" (layers.REMAT_POLICIES)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Sizes of the vision tower; defaults are ViT-L/14 at 224 px."""

    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "xla"
    remat: bool = False
    remat_policy: str = "full"  # with remat: "full" | "dots" (layers.REMAT_POLICIES)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# Config fields that are settings, not parameter sizes: a from_pretrained keyword overrides the
# file's value (as in transformers), and weights.clip need not repeat config.model's.
# eos_token_id picks the pooled token; 2 (legacy transformers configs) pools at the largest id.
NOT_SIZES = ("eos_token_id",)

CLIP_VIT_L14_TEXT = CLIPTextConfig()
CLIP_VIT_L14_VISION = CLIPVisionConfig()

# transformers writes only the fields that differ from its own defaults into config.json.
_HF_TEXT_DEFAULTS = dict(
    vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
    num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
    layer_norm_eps=1e-5, eos_token_id=49407,
)  # fmt: skip
_HF_VISION_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)  # fmt: skip


def text_config_from_hf(
    hf: dict[str, Any], source: str = "config.json", **overrides
) -> CLIPTextConfig:
    """Our text config from a transformers CLIPTextConfig dict (or a CLIPConfig's text_config).
    `overrides`: run-time fields (dtype, attention, ...) and NOT_SIZES (eos_token_id) replace
    the file's value; a size field must repeat it; an unknown one is a TypeError naming
    `source`."""
    hf = {**_HF_TEXT_DEFAULTS, **hf.get("text_config", hf)}
    cfg = CLIPTextConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        max_positions=hf["max_position_embeddings"],
        hidden_act=hf["hidden_act"],
        layer_norm_eps=hf["layer_norm_eps"],
        eos_token_id=hf["eos_token_id"],
    )
    return _apply_overrides(cfg, overrides, source)


def vision_config_from_hf(
    hf: dict[str, Any], source: str = "config.json", **overrides
) -> CLIPVisionConfig:
    """Our vision config from a transformers CLIPVisionConfig dict (or a CLIPConfig's);
    `overrides` as text_config_from_hf's."""
    hf = {**_HF_VISION_DEFAULTS, **hf.get("vision_config", hf)}
    cfg = CLIPVisionConfig(
        image_size=hf["image_size"],
        patch_size=hf["patch_size"],
        num_channels=hf["num_channels"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        hidden_act=hf["hidden_act"],
        layer_norm_eps=hf["layer_norm_eps"],
    )
    return _apply_overrides(cfg, overrides, source)


def _apply_overrides(cfg, overrides: dict, source: str):
    """diffusers_format's rule for the UNet and VAE: run-time fields and NOT_SIZES are free, a
    size field may only repeat the file's value, an unknown one is named (imported here: that
    module imports the UNet and VAE)."""
    from catflax.weights import diffusers_format

    return diffusers_format._apply_overrides(cfg, overrides, source, free=NOT_SIZES)


def _dtypes(cfg) -> dict[str, Any]:
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


class CLIPAttention(nnx.Module):
    """Multi-head self-attention with biased q/k/v/out projections (initialised like PyTorch's
    nn.Linear, as the reference's semantic inpainter; the CLIP towers are always loaded)."""

    def __init__(self, width: int, num_heads: int, attention: str, *, rngs: nnx.Rngs, **dt):
        self.num_heads, self.attention = num_heads, attention
        self.q_proj = torch_linear(width, width, rngs=rngs, **dt)
        self.k_proj = torch_linear(width, width, rngs=rngs, **dt)
        self.v_proj = torch_linear(width, width, rngs=rngs, **dt)
        self.out_proj = torch_linear(width, width, rngs=rngs, **dt)

    def __call__(self, x_BLD: jax.Array, mask=None, is_causal: bool = False) -> jax.Array:
        B, L, D = x_BLD.shape
        heads = lambda t: t.reshape(B, L, self.num_heads, D // self.num_heads)  # noqa: E731
        out = dot_product_attention(
            heads(self.q_proj(x_BLD)),
            heads(self.k_proj(x_BLD)),
            heads(self.v_proj(x_BLD)),
            mask=mask,
            is_causal=is_causal,
            implementation=self.attention,
        )
        return self.out_proj(out.reshape(B, L, D))


class CLIPMLP(nnx.Module):
    """fc1 -> activation -> fc2 (PyTorch's nn.Linear initialisation)."""

    def __init__(self, width: int, hidden: int, act: str, *, rngs: nnx.Rngs, **dt):
        self.act = activation(act)
        self.fc1 = torch_linear(width, hidden, rngs=rngs, **dt)
        self.fc2 = torch_linear(hidden, width, rngs=rngs, **dt)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        dt = _dtypes(cfg)
        eps, width = cfg.layer_norm_eps, cfg.hidden_size
        self.layer_norm1 = layer_norm(width, eps, rngs=rngs, **dt)
        self.self_attn = CLIPAttention(width, cfg.num_heads, cfg.attention, rngs=rngs, **dt)
        self.layer_norm2 = layer_norm(width, eps, rngs=rngs, **dt)
        self.mlp = CLIPMLP(width, cfg.intermediate_size, cfg.hidden_act, rngs=rngs, **dt)

    def __call__(self, x: jax.Array, mask=None, is_causal: bool = False) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask, is_causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.remat = remat_mode(cfg)
        self.layers = nnx.List([CLIPEncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])

    def __call__(self, x: jax.Array, mask=None, is_causal: bool = False) -> jax.Array:
        for layer in self.layers:
            if self.remat:
                x = remat(lambda m, h: m(h, mask, is_causal), self.remat)(layer, x)
            else:
                x = layer(x, mask, is_causal)
        return x


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        dt = _dtypes(cfg)
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, **dt)
        self.position_embedding = nnx.Embed(cfg.max_positions, cfg.hidden_size, rngs=rngs, **dt)

    def __call__(self, input_ids_BL: jax.Array) -> jax.Array:
        positions = jnp.arange(input_ids_BL.shape[1])
        return self.token_embedding(input_ids_BL) + self.position_embedding(positions)[None]


class CLIPTextTransformer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.eos_token_id = cfg.eos_token_id
        self.embeddings = CLIPTextEmbeddings(cfg, rngs=rngs)
        self.encoder = CLIPEncoder(cfg, rngs=rngs)
        self.final_layer_norm = layer_norm(
            cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs, **_dtypes(cfg)
        )

    def __call__(self, input_ids_BL: jax.Array, attention_mask_BL: jax.Array | None = None):
        mask = None
        if attention_mask_BL is not None:
            mask = attention_mask_BL.astype(bool)[:, None, None, :]
        h = self.encoder(self.embeddings(input_ids_BL), mask, is_causal=True)
        last_hidden_BLD = self.final_layer_norm(h)
        # transformers: the first EOS token (or the largest id, for legacy configs with eos id 2).
        if self.eos_token_id == 2:
            eos_index_B = jnp.argmax(input_ids_BL, axis=-1)
        else:
            eos_index_B = jnp.argmax(input_ids_BL == self.eos_token_id, axis=-1)
        pooled_BD = jnp.take_along_axis(last_hidden_BLD, eos_index_B[:, None, None], axis=1)[:, 0]
        return last_hidden_BLD, pooled_BD


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        dt = _dtypes(cfg)
        p, width = cfg.patch_size, cfg.hidden_size
        self.class_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (width,), dt["param_dtype"])
        )
        self.patch_embedding = nnx.Conv(
            cfg.num_channels, width, (p, p), strides=(p, p), padding="VALID", use_bias=False,
            rngs=rngs, **dt,
        )  # fmt: skip
        self.position_embedding = nnx.Embed(cfg.num_patches + 1, width, rngs=rngs, **dt)

    def __call__(self, pixels_BHWC: jax.Array) -> jax.Array:
        patches = self.patch_embedding(pixels_BHWC)
        B, _, _, D = patches.shape
        patches = patches.reshape(B, -1, D)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype), (B, 1, D))
        x = jnp.concatenate([cls, patches], axis=1)
        return x + self.position_embedding(jnp.arange(x.shape[1]))[None]


class CLIPVisionTransformer(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        dt, eps = _dtypes(cfg), cfg.layer_norm_eps
        self.embeddings = CLIPVisionEmbeddings(cfg, rngs=rngs)
        self.pre_layernorm = layer_norm(cfg.hidden_size, eps, rngs=rngs, **dt)
        self.encoder = CLIPEncoder(cfg, rngs=rngs)
        self.post_layernorm = layer_norm(cfg.hidden_size, eps, rngs=rngs, **dt)

    def __call__(self, pixels_BHWC: jax.Array):
        last_hidden_BLD = self.encoder(self.pre_layernorm(self.embeddings(pixels_BHWC)))
        pooled_BD = self.post_layernorm(last_hidden_BLD[:, 0])
        return last_hidden_BLD, pooled_BD


def _rename_vision(key: str) -> str:
    return key.replace("pre_layernorm", "pre_layrnorm")  # transformers' spelling


def _from_pretrained(
    cls, path, config_fn, prefix, rename, dtype, param_dtype, allow_pickle, place, variant,
    **overrides,
):  # fmt: skip
    from catflax.weights import convert, io

    config_path = os.path.join(path, "config.json")
    hf_config = io.read_json(config_path)
    cfg = config_fn(hf_config, config_path, dtype=dtype, param_dtype=param_dtype, **overrides)
    state = io.read_state_dict(path, allow_pickle=allow_pickle, variant=variant)
    if not any(k.startswith(prefix) for k in state):  # a bare tower saved without its prefix
        state = {prefix + k: v for k, v in state.items()}
    # A CLIPModel directory holds both towers and the projections: take this tower's keys.
    other = (
        "text_model.",
        "vision_model.",
        "text_projection.",
        "visual_projection.",
        "logit_scale",
    )
    state = {k: v for k, v in state.items() if k.startswith(prefix) or not k.startswith(other)}
    state.pop(f"{prefix}embeddings.position_ids", None)  # a buffer, saved by old versions
    abstract = abstract_module(lambda rngs: cls(cfg, rngs=rngs))
    model, _ = convert.load_state_dict(
        abstract, state, source_name=path, rename=rename, place=place
    )
    return model


class CLIPTextModel(nnx.Module):
    """CLIP text tower: token ids (B,L) -> (last_hidden (B,L,D), pooled at EOS (B,D))."""

    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg, rngs=rngs)

    def __call__(self, input_ids_BL: jax.Array, attention_mask_BL: jax.Array | None = None):
        return self.text_model(input_ids_BL, attention_mask_BL)

    @classmethod
    def from_pretrained(
        cls, path: str, dtype: str = "float32", param_dtype: str = "float32",
        allow_pickle: bool = False, place=None, variant: str | None = None, **overrides,
    ) -> CLIPTextModel:  # fmt: skip
        """Loads a transformers CLIPTextModel or CLIPModel directory (safetensors by default;
        `variant`: e.g. "fp16" for model.fp16.safetensors)."""
        return _from_pretrained(
            cls, path, text_config_from_hf, "text_model.", None, dtype, param_dtype,
            allow_pickle, place, variant, **overrides,
        )  # fmt: skip


class CLIPVisionModel(nnx.Module):
    """CLIP vision tower: normalised NHWC pixels -> (last_hidden before post-LN, pooled CLS)."""

    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.vision_model = CLIPVisionTransformer(cfg, rngs=rngs)

    def __call__(self, pixels_BHWC: jax.Array):
        return self.vision_model(pixels_BHWC)

    @classmethod
    def from_pretrained(
        cls, path: str, dtype: str = "float32", param_dtype: str = "float32",
        allow_pickle: bool = False, place=None, variant: str | None = None, **overrides,
    ) -> CLIPVisionModel:  # fmt: skip
        """Loads a transformers CLIPVisionModel or CLIPModel directory (see CLIPTextModel)."""
        return _from_pretrained(
            cls, path, vision_config_from_hf, "vision_model.", _rename_vision, dtype,
            param_dtype, allow_pickle, place, variant, **overrides,
        )  # fmt: skip
