"""Pretrained weights named by `config.weights`, loaded straight into their target shardings."""

from __future__ import annotations

import dataclasses
import os

import jax
from absl import logging
from flax import nnx

from catflax.models import clip
from catflax.models.cat import CATConfig, ConfigError
from catflax.weights import io
from catflax.weights.diffusers_format import RUNTIME_FIELDS


def _placer(shardings, part: str):
    return lambda path, array: jax.device_put(array, shardings[(part, *path)])


def _params(model) -> nnx.State:
    return nnx.state(model, nnx.Param)


# Config fields that are not sizes: run-time choices and the CLIP settings a from_pretrained
# keyword overrides (eos_token_id: transformers' legacy CLIP configs say 2, pooling at the
# largest id, the same position as 49407 with the CLIP vocabulary).
_NOT_SIZES = {*RUNTIME_FIELDS, *clip.NOT_SIZES}


def _check_tower_sizes(folder: str, part: str, wanted, found) -> None:
    """A CLIP folder's tower must have config.model's sizes (the towers are built from the
    config; a 336 px or ViT-B file would otherwise fail later without a name, or not at all)."""
    diffs = [
        f"{f.name}: {getattr(wanted, f.name)!r} in config.model.{part}, "
        f"{getattr(found, f.name)!r} in the file"
        for f in dataclasses.fields(wanted)
        if f.name not in _NOT_SIZES and getattr(wanted, f.name) != getattr(found, f.name)
    ]
    if diffs:
        raise ConfigError(
            f"{os.path.join(folder, 'config.json')}: this CLIP does not fit config.model.{part} "
            f"({'; '.join(diffs)}); set config.model.{part} to the file's sizes, or name the "
            "CLIP the config describes"
        )


def load_into(params: nnx.State, shardings, config) -> list[str]:
    """Replaces parts of `params` (a CATDiffusion parameter state) by the weights that
    config.weights names; returns one note per part loaded. Empty paths keep the random init
    (`check_training_weights` says where training should not start from it).

    - weights.cat:  an official CAT-Diffusion checkpoint (every part but the tokenizer; the
                    CLIP towers from weights.clip instead where that is given; weights.sd
                    is then not used: it would replace the trained UNet and adapter);
    - weights.clip: a transformers CLIP directory (text and vision towers);
    - weights.sd:   SD-1.5-inpainting (diffusers directory or LDM file): UNet and VAE, the
                    reference adapter freshly initialised as stage 1b starts (SPEC.md §2).
    - weights.pooling_vae: True replaces the VAE by catflax.weights.pooling_vae's fixed
                    block-average encoder / block-copy decoder (the demo's VAE).
    """
    from catflax.models.inpainter import SemanticInpainter
    from catflax.models.unet import UNet
    from catflax.models.vae import AutoencoderKL
    from catflax.weights import ldm

    w, cfg, notes = config.weights, CATConfig.from_dict(config.model), []
    allow_pickle = bool(w.get("allow_pickle", False))
    if w.get("cat", ""):
        state = ldm.read_checkpoint(w.cat, allow_pickle)
        fusion = ldm.split_checkpoint(state)["fusion_model"]
        if not fusion:  # e.g. an SD-1.5 file: refused before anything loads
            raise io.WeightFileError(
                f"weights.cat={w.cat}: not a CAT-Diffusion checkpoint (no fusion_model.* keys)"
            )
        src = dict(source_name=w.cat)
        params["inpainter"] = _params(
            SemanticInpainter.from_state_dict(
                fusion, cfg.inpainter, prefix="", place=_placer(shardings, "inpainter"), **src
            )
        )
        unet = ldm.load_unet(state, cfg.unet, place=_placer(shardings, "unet"), **src)[0]
        vae = ldm.load_vae(state, cfg.vae, place=_placer(shardings, "vae"), **src)[0]
        params["unet"], params["vae"] = _params(unet), _params(vae)
        if not w.clip:  # weights.clip, where given, supplies the towers instead
            text = ldm.load_clip_text(
                state, cfg.clip_text, place=_placer(shardings, "clip_text"), **src
            )
            vision = ldm.load_clip_vision(
                state, cfg.clip_vision, place=_placer(shardings, "clip_vision"), **src
            )
            params["clip_text"], params["clip_vision"] = _params(text), _params(vision)
        notes.append(f"every part from the CAT-Diffusion checkpoint {w.cat}")
    if w.clip:
        towers = (
            ("clip_text", clip.CLIPTextModel, cfg.clip_text),
            ("clip_vision", clip.CLIPVisionModel, cfg.clip_vision),
        )
        hf_config = io.read_json(os.path.join(w.clip, "config.json"))
        _check_tower_sizes(w.clip, "clip_text", cfg.clip_text, clip.text_config_from_hf(hf_config))
        _check_tower_sizes(
            w.clip, "clip_vision", cfg.clip_vision, clip.vision_config_from_hf(hf_config)
        )
        for part, tower, tower_cfg in towers:
            model = tower.from_pretrained(
                w.clip, dtype=tower_cfg.dtype, param_dtype=tower_cfg.param_dtype,
                allow_pickle=allow_pickle, place=_placer(shardings, part),
                attention=tower_cfg.attention, remat=tower_cfg.remat,
            )  # fmt: skip
            params[part] = _params(model)
        notes.append(f"CLIP towers from {w.clip}")
    if w.sd and w.get("cat", ""):  # SD weights would replace the checkpoint's trained UNet
        notes.append(f"weights.sd={w.sd} not used: weights.cat gives the UNet and VAE")
        logging.warning(notes[-1])
    elif w.sd:
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


def check_training_weights(w) -> None:
    """Before training: the CLIP towers and the VAE are frozen in every stage, so left at random
    initialisation they stay random, which only tests and the demo want
    (`weights.random_frozen`); a UNet without SD weights trains from scratch (a warning)."""
    if not (w.get("cat", "") or w.sd or w.get("random_frozen", False)):
        logging.warning(
            "the UNet starts from random initialisation: config.weights.sd (SD-1.5-inpainting) "
            "and config.weights.cat are empty"
        )
    missing = []
    if not (w.get("cat", "") or w.clip):
        missing.append("the CLIP text and vision towers (weights.clip or weights.cat)")
    if not (w.get("cat", "") or w.sd or w.get("pooling_vae", False)):
        missing.append("the VAE (weights.sd, weights.cat or weights.pooling_vae)")
    if missing and not w.get("random_frozen", False):
        raise ConfigError(
            f"config.weights gives no weights for {' or '.join(missing)}; these parts are frozen, "
            "so they would stay at random initialisation for the whole run. Name the weights "
            "(e.g. --config.weights.clip=DIR --config.weights.sd=DIR), or set "
            "--config.weights.random_frozen=True to train with random frozen parts on purpose"
        )
