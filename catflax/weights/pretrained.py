"""Pretrained weights named by `config.weights`, loaded straight into their target shardings."""

from __future__ import annotations

import jax
from flax import nnx

from catflax.models.cat import CATConfig


def _placer(shardings, part: str):
    return lambda path, array: jax.device_put(array, shardings[(part, *path)])


def _params(model) -> nnx.State:
    return nnx.state(model, nnx.Param)


def load_into(params: nnx.State, shardings, config) -> list[str]:
    """Replaces parts of `params` (a CATDiffusion parameter state) by the weights that
    config.weights names; returns one note per part loaded. Empty paths keep the random init.

    - weights.cat:  an official CAT-Diffusion checkpoint (every part but the tokenizer);
    - weights.clip: a transformers CLIP directory (text and vision towers);
    - weights.sd:   SD-1.5-inpainting (diffusers directory or LDM file): UNet and VAE, the
                    reference adapter freshly initialised as stage 1b starts (SPEC.md §2).
    - weights.pooling_vae: True replaces the VAE by catflax.weights.pooling_vae's fixed
                    block-average encoder / block-copy decoder (the demo's VAE).
    """
    from catflax.models import clip
    from catflax.models.inpainter import SemanticInpainter
    from catflax.models.unet import UNet
    from catflax.models.vae import AutoencoderKL
    from catflax.weights import ldm

    w, cfg, notes = config.weights, CATConfig.from_dict(config.model), []
    allow_pickle = bool(w.get("allow_pickle", False))
    if w.get("cat", ""):
        state = ldm.read_checkpoint(w.cat, allow_pickle)
        fusion = ldm.split_checkpoint(state)["fusion_model"]
        params["unet"] = _params(
            ldm.load_unet(state, cfg.unet, source_name=w.cat, place=_placer(shardings, "unet"))[0]
        )
        params["vae"] = _params(
            ldm.load_vae(state, cfg.vae, source_name=w.cat, place=_placer(shardings, "vae"))[0]
        )
        params["clip_text"] = _params(
            ldm.load_clip_text(
                state, cfg.clip_text, source_name=w.cat, place=_placer(shardings, "clip_text")
            )
        )
        params["clip_vision"] = _params(
            ldm.load_clip_vision(
                state, cfg.clip_vision, source_name=w.cat, place=_placer(shardings, "clip_vision")
            )
        )
        params["inpainter"] = _params(
            SemanticInpainter.from_state_dict(
                fusion,
                cfg.inpainter,
                prefix="",
                source_name=w.cat,
                place=_placer(shardings, "inpainter"),
            )
        )
        notes.append(f"every part from the CAT-Diffusion checkpoint {w.cat}")
    if w.clip:
        towers = (
            ("clip_text", clip.CLIPTextModel, cfg.clip_text),
            ("clip_vision", clip.CLIPVisionModel, cfg.clip_vision),
        )
        for part, tower, tower_cfg in towers:
            model = tower.from_pretrained(
                w.clip, dtype=tower_cfg.dtype, param_dtype=tower_cfg.param_dtype,
                allow_pickle=allow_pickle, place=_placer(shardings, part),
                attention=tower_cfg.attention, remat=tower_cfg.remat,
            )  # fmt: skip
            params[part] = _params(model)
        notes.append(f"CLIP towers from {w.clip}")
    if w.sd:
        unet, report = UNet.from_pretrained(
            w.sd, config=cfg.unet, init_missing_adapter=True, seed=config.seed,
            allow_pickle=allow_pickle, place=_placer(shardings, "unet"), output_loading_info=True,
        )  # fmt: skip
        vae = AutoencoderKL.from_pretrained(
            w.sd, config=cfg.vae, allow_pickle=allow_pickle, place=_placer(shardings, "vae")
        )
        params["unet"], params["vae"] = _params(unet), _params(vae)
        notes.append(f"UNet and VAE from {w.sd}: {report.summary()}")
    if w.get("pooling_vae", False):  # the demo: random frozen VAEs cannot decode colours
        from catflax.weights.pooling_vae import pooling_vae_arrays

        arrays, place = pooling_vae_arrays(cfg.vae), _placer(shardings, "vae")
        params["vae"] = nnx.map_state(lambda p, v: v.replace(place(p, arrays[p])), params["vae"])
        notes.append("VAE: the hand-set average-pool / upsample autoencoder (pooling_vae)")
    return notes
