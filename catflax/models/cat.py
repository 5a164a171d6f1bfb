"""CATDiffusion: frozen CLIP towers, VAE, semantic inpainter and UNet, wired as SPEC.md says."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from catflax.models import inpainter as inpainter_lib
from catflax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel
from catflax.models.inpainter import InpainterConfig, SemanticInpainter
from catflax.models.unet import UNet, UNetConfig
from catflax.models.vae import AutoencoderKL, VAEConfig
from catflax.preprocess import clip_normalize


class ConfigError(ValueError):
    """config.model does not describe a valid model."""


@dataclasses.dataclass(frozen=True)
class CATConfig:
    """Every part's config; defaults are the full model of SPEC.md §1."""

    clip_text: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
    clip_vision: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    vae: VAEConfig = dataclasses.field(default_factory=VAEConfig)
    unet: UNetConfig = dataclasses.field(default_factory=UNetConfig)
    inpainter: InpainterConfig = dataclasses.field(default_factory=InpainterConfig)

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Mapping[str, Any]], where: str = "config.model"
    ) -> CATConfig:
        """From `config.model` (one dict of fields per part); unknown fields and values of the
        wrong type are errors naming `where`.part.field (`where`: what holds `d`)."""
        import numbers
        import typing

        def typed(value: Any, want: Any, key: str) -> Any:
            """`value` as a field of type `want` (int, float, bool, str, tuple[X, ...]), else a
            ConfigError naming `key`; a list is a tuple (JSON has none), an int a float."""
            if typing.get_origin(want) is tuple:
                if not isinstance(value, list | tuple):
                    raise ConfigError(f"{key}: expected a list, got {value!r}")
                item = typing.get_args(want)[0]
                return tuple(typed(v, item, f"{key}[{i}]") for i, v in enumerate(value))
            number = {int: numbers.Integral, float: numbers.Real}.get(want)
            if number is not None:
                if isinstance(value, number) and not isinstance(value, bool):
                    return want(value)
            elif want not in (bool, str) or isinstance(value, want):
                return value  # checked, or a type this check does not know
            raise ConfigError(f"{key}: expected {want.__name__}, got {value!r}")

        types = dict(
            clip_text=CLIPTextConfig, clip_vision=CLIPVisionConfig, vae=VAEConfig,
            unet=UNetConfig, inpainter=InpainterConfig,
        )  # fmt: skip
        if not hasattr(d, "keys"):  # a dict or an ml_collections ConfigDict (not a Mapping)
            raise ConfigError(f"{where}: expected a dict of parts, got {d!r}")
        unknown = set(d) - set(types)
        if unknown:
            raise ConfigError(f"{where} has unknown parts {sorted(unknown)}; known: {list(types)}")
        kwargs = {}
        for name, value in d.items():
            if not hasattr(value, "keys"):
                raise ConfigError(f"{where}.{name}: expected a dict of fields, got {value!r}")
            fields = typing.get_type_hints(types[name])
            checked = {
                k: typed(v, fields[k], f"{where}.{name}.{k}") if k in fields else v
                for k, v in dict(value).items()
            }
            try:
                kwargs[name] = types[name](**checked)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{where}.{name}: {e}") from e
        return cls(**kwargs)


class CATDiffusion(nnx.Module):
    """All parts of CAT-Diffusion; the training steps and the sampler call its methods."""

    def __init__(self, cfg: CATConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.clip_text = CLIPTextModel(cfg.clip_text, rngs=rngs)
        self.clip_vision = CLIPVisionModel(cfg.clip_vision, rngs=rngs)
        self.vae = AutoencoderKL(cfg.vae, rngs=rngs)
        self.unet = UNet(cfg.unet, rngs=rngs)
        self.inpainter = SemanticInpainter(cfg.inpainter, rngs=rngs)

    def teacher(self, images224_BHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Frozen CLIP vision features of uint8 images: (last hidden (B,1+P,D), pooled (B,D))."""
        last, pooled = self.clip_vision(clip_normalize(images224_BHWC))
        return jax.lax.stop_gradient(last), jax.lax.stop_gradient(pooled)

    def encode_text(self, input_ids_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Frozen CLIP text: (context (B,L,768) for the UNet, pooled label (B,768))."""
        context, pooled = self.clip_text(input_ids_BL)
        return jax.lax.stop_gradient(context), jax.lax.stop_gradient(pooled)

    def encode_latents(self, images_BHWC: jax.Array, rng: jax.Array) -> jax.Array:
        """A sample of the frozen VAE posterior of [-1,1] images, times the latent scale."""
        return jax.lax.stop_gradient(self.vae.encode_to_diffusion(images_BHWC, rng))

    def decode_latents(self, latents_BhwC: jax.Array) -> jax.Array:
        """Latents (scaled) -> images in [-1,1]."""
        return self.vae.decode_from_diffusion(latents_BhwC)

    def semantic_tokens(self, mode: str, batch: Mapping[str, jax.Array], label_BE: jax.Array):
        """The UNet's semantic tokens (B,64,D): teacher features of the unmasked image (stage 1b)
        or the inpainter's blended and pooled prediction (stage 2, inference)."""
        if mode == "teacher":
            last, _ = self.teacher(batch["image224"])
            return inpainter_lib.teacher_tokens(last)
        if mode == "inpainter":
            last, pooled = self.teacher(batch["masked224"])
            tokens, _ = self.inpainter.predict_tokens(last, batch["mask16"], label_BE, pooled)
            return tokens
        raise ValueError(f"semantic token mode {mode!r} not in ('teacher', 'inpainter')")

    def predict_noise(
        self,
        noisy_BhwC: jax.Array,
        t_B: jax.Array,
        mask64_Bhw1: jax.Array,
        masked_latents_BhwC: jax.Array,
        context_BLD: jax.Array,
        tokens_BKD: jax.Array,
    ) -> jax.Array:
        """The UNet on concat([noisy latents, mask, masked-image latents]) (9 channels)."""
        mask = mask64_Bhw1.astype(noisy_BhwC.dtype)
        if mask.ndim == 3:
            mask = mask[..., None]
        x = jnp.concatenate([noisy_BhwC, mask, masked_latents_BhwC.astype(noisy_BhwC.dtype)], -1)
        return self.unet(x, t_B, context_BLD, tokens_BKD)
