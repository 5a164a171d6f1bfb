"""The catflax pipeline directory: what `CATPipeline.save_pretrained` writes and
`CATPipeline.from_pretrained` reads.

    config.json               {"format": "catflax-pipeline", "format_version": 1,
                               "model": {part: its config's fields, for clip_text,
                                         clip_vision, vae, unet and inpainter},
                               "resolution": 512, "clip_resolution": 224,
                               "sampling": {"num_steps": 50, "guidance_scale": 7.5, "eta": 0.0}}
    clip_text.safetensors     transformers CLIPTextModel names (text_model.*)
    clip_vision.safetensors   transformers CLIPVisionModel names (vision_model.*)
    vae.safetensors           diffusers AutoencoderKL names
    unet.safetensors          diffusers UNet2DConditionModel names + ref_attn/ref_norm
    inpainter.safetensors     the reference's fusion_model names, without the prefix
    tokenizer/                a transformers CLIPTokenizer directory
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from catflax.models.cat import CATConfig, CATDiffusion
from catflax.models.rngs import abstract_module
from catflax.weights import convert, io

FORMAT, FORMAT_VERSION = "catflax-pipeline", 1
COMPONENTS = ("clip_text", "clip_vision", "vae", "unet", "inpainter")
ENTRIES = ("config.json", *(f"{n}.safetensors" for n in COMPONENTS), "tokenizer")  # and no other
_VISION_NAME = ("pre_layernorm", "pre_layrnorm")  # ours -> transformers' spelling


def _component_rename(name: str):
    """PyTorch-style name of our parameter names in the export files (None: unchanged)."""
    if name == "clip_vision":
        return lambda k: k.replace(*_VISION_NAME)
    return None


def component_state_dict(model: CATDiffusion, name: str) -> dict[str, np.ndarray]:
    """One component's tensors under the names its file in the directory uses."""
    if name == "inpainter":
        return model.inpainter.state_dict(prefix="")
    return convert.export_state_dict(getattr(model, name), _component_rename(name))


def write_directory(
    path: str, model: CATDiffusion, tokenizer, resolution: int, sampling: Mapping[str, Any]
) -> None:
    """Writes the directory (see the module docstring); a folder whose config.json is not a
    pipeline's (a training workdir, a diffusers folder) is refused, not overwritten."""
    existing = os.path.join(path, "config.json")
    if os.path.isfile(existing):
        try:
            ours = io.read_json(existing).get("format") == FORMAT
        except (io.WeightFileError, AttributeError):
            ours = False
        if not ours:
            raise io.WeightFileError(
                f"{existing}: exists and is not a catflax pipeline config (a training run's, or "
                "another model's?); write the pipeline to another folder"
            )
    os.makedirs(path, exist_ok=True)
    for name in COMPONENTS:
        tensors = component_state_dict(model, name)
        io.write_safetensors(os.path.join(path, f"{name}.safetensors"), tensors)
    tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
    cfg = model.config
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {name: dataclasses.asdict(getattr(cfg, name)) for name in COMPONENTS},
        "resolution": resolution,
        "clip_resolution": cfg.clip_vision.image_size,
        "sampling": dict(sampling),
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(meta, f, indent=2)


def read_config(path: str) -> dict[str, Any]:
    """The directory's config.json, checked to be ours and not newer than this code reads."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise io.WeightFileError(
            f"{path}: not a catflax pipeline directory (no config.json); for an official "
            "CAT-Diffusion checkpoint pass the checkpoint file itself"
        )
    meta = io.read_json(config_path)
    if meta.get("format") != FORMAT:
        raise io.WeightFileError(
            f"{config_path}: not a catflax pipeline config (format {meta.get('format')!r}, "
            f"expected {FORMAT!r})"
        )
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise io.WeightFileError(
            f"{config_path}: format_version {meta['format_version']} is newer than this catflax "
            f"reads ({FORMAT_VERSION})"
        )
    model = meta.get("model")
    missing = [f"model.{n}" for n in COMPONENTS if not isinstance(model, dict) or n not in model]
    if not isinstance(meta.get("resolution"), int):
        missing.append("resolution")
    if missing:
        raise io.WeightFileError(f"{config_path}: missing or malformed {missing}")
    try:  # every field of the right type (the caller builds the config again from the dict)
        CATConfig.from_dict(model, where="model")
    except ValueError as e:  # ConfigError: a wrong type, an unknown field, sizes that do not fit
        raise io.WeightFileError(f"{config_path}: {e}") from e
    return meta


def with_overrides(cfg: CATConfig, over: Mapping[str, str]) -> CATConfig:
    """`cfg` with the same field values (dtype, attention, ...) set in every component."""
    return CATConfig(**{n: dataclasses.replace(getattr(cfg, n), **over) for n in COMPONENTS})


def load_directory(path: str, cfg: CATConfig) -> CATDiffusion:
    """The model of a directory, built to `cfg` (its config.json's, maybe with overrides)."""
    model = abstract_module(lambda rngs: CATDiffusion(cfg, rngs=rngs))
    for name in COMPONENTS:
        file = os.path.join(path, f"{name}.safetensors")
        if not os.path.isfile(file):
            raise io.WeightFileError(f"{file}: missing from the catflax pipeline directory")
        state = io.read_safetensors(file)
        if name == "inpainter":
            part = type(model.inpainter).from_state_dict(
                state, cfg.inpainter, prefix="", source_name=file
            )
        else:
            abstract = getattr(model, name)
            rename = _component_rename(name)
            part, _ = convert.load_state_dict(abstract, state, source_name=file, rename=rename)
        setattr(model, name, part)
    return model
