"""CATPipeline: image + mask + prompt -> inpainted image, from a catflax pipeline directory
(`catflax.weights.pipeline_format`) or an official CAT-Diffusion checkpoint (SPEC.md §4
evaluation preprocessing, §6 sampling).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import numbers
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image

from catflax import diffusion
from catflax import images as image_io
from catflax import sharding as sharding_lib
from catflax.data import geometry
from catflax.models.cat import CATConfig, CATDiffusion
from catflax.models.rngs import abstract_module
from catflax.tokenizer import clean_text, load_tokenizer, tokenize
from catflax.weights import io, pipeline_format

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Defaults of `CATPipeline.__call__` (SPEC.md §6)."""

    num_steps: int = 50  # DDIM steps
    guidance_scale: float = 7.5  # classifier-free guidance; 1.0 = conditional branch only
    eta: float = 0.0  # 0 = deterministic DDIM


def sampling_config(settings: Mapping[str, Any], where: str = "sampling") -> SamplingConfig:
    """A SamplingConfig from a mapping; unknown keys are an error naming `where`."""
    known = {f.name for f in dataclasses.fields(SamplingConfig)}
    if unknown := sorted(set(settings) - known):
        raise ValueError(f"{where}: unknown setting(s) {unknown}; known: {sorted(known)}")
    return SamplingConfig(**{k: settings[k] for k in settings})


# ---------------------------------------------------------------------------------------------
# Sampling: one jitted function for every pipeline; compiles once per (graph, batch, steps,
# eta > 0 or not, guided or not)
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "num_steps", "stochastic", "guided"))
def _generate(graphdef, state, inputs, guidance_scale, eta, *, num_steps, stochastic, guided):
    """(B,R,R,3) uint8 images. Each example's noise (x_T, masked latents, DDIM's per-step noise
    for eta > 0) comes from its own seed: its result does not depend on the rest of its batch."""
    model = nnx.merge(graphdef, state)
    keys = jax.vmap(jax.random.key)(inputs["seeds"])
    context, label = model.encode_text(inputs["input_ids"])
    tokens = model.semantic_tokens("inpainter", inputs, label)
    # masked latents: scale x a posterior sample (as the reference), per-example noise
    posterior = model.vae.encode(inputs["masked512"])
    shape_1 = posterior.mean.shape[1:]
    eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), shape_1))(keys)
    masked_latents = model.vae.config.scaling_factor * (
        posterior.mean + posterior.std * eps.astype(posterior.mean.dtype)
    )
    mask64 = inputs["mask64"]
    B, (h, w, c) = mask64.shape[0], (*mask64.shape[1:3], model.unet.config.out_channels)

    def model_fn(x, t, cond):
        ctx, tok, mask, latents = cond
        return model.predict_noise(x, t, mask, latents, ctx, tok)

    cond = (context, tokens, mask64, masked_latents)
    uncond = None
    if guided:  # SPEC.md §6: empty prompt AND zero tokens; mask and masked latents shared
        empty_context, _ = model.encode_text(inputs["empty_ids"])
        uncond = (empty_context, jnp.zeros_like(tokens), mask64, masked_latents)
    latents = diffusion.ddim_sample(
        model_fn, cond, uncond, key=keys, shape=(B, h, w, c), num_steps=num_steps,
        guidance_scale=guidance_scale, eta=eta, stochastic=stochastic,
    )  # fmt: skip
    images = model.decode_latents(latents).astype(jnp.float32)
    return jnp.clip(images * 127.5 + 127.5, 0, 255).astype(jnp.uint8)  # truncated, as the ref


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


def check_resolution(cfg: CATConfig, resolution: int) -> None:
    """Raises ValueError unless `resolution` is a positive multiple of the model's total
    downsampling (the VAE factor times the UNet's)."""
    vae_factor, unet_factor = cfg.vae.downsampling_factor, cfg.unet.downsampling_factor
    step = vae_factor * unet_factor
    if resolution <= 0 or resolution % step:
        raise ValueError(
            f"resolution={resolution} must be a positive multiple of {step} (VAE factor "
            f"{vae_factor} x UNet downsampling {unet_factor})"
        )


def check_tokenizer(cfg: CATConfig, tokenizer) -> None:
    """Raises ValueError if the tokenizer has more tokens than the CLIP text tower embeds."""
    if len(tokenizer) > cfg.clip_text.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens, the CLIP text tower only "
            f"{cfg.clip_text.vocab_size}"
        )


class CATPipeline:
    """Text-guided object inpainting with a CATDiffusion model (SPEC.md §6):

    pipe = CATPipeline.from_pretrained("catflax-pipeline/")
    image = pipe("in.jpg", "mask.png", "a red ball")   # PIL image, the input's size
    """

    def __init__(
        self,
        model: CATDiffusion,
        tokenizer=None,
        *,
        resolution: int = 512,
        sampling: SamplingConfig | Mapping[str, Any] | None = None,
    ):
        cfg = model.config
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
        self.resolution = int(resolution)
        if sampling is not None and not isinstance(sampling, SamplingConfig):
            sampling = sampling_config(sampling)
        self.sampling = sampling or SamplingConfig()
        vision, grid = cfg.clip_vision, cfg.inpainter.grid_size
        if vision.image_size // vision.patch_size != grid:
            raise ValueError(
                f"clip_vision {vision.image_size}px / patch {vision.patch_size} gives a "
                f"{vision.image_size // vision.patch_size}-patch grid; the inpainter expects {grid}"
            )
        check_resolution(cfg, self.resolution)
        self.sizes = geometry.Sizes(self.resolution, vision.image_size, grid)
        self.vae_factor = cfg.vae.downsampling_factor
        check_tokenizer(cfg, self.tokenizer)
        self.graphdef, self.state = nnx.split(model)
        self._empty_ids = self._tokenize([""])[0]

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_model(cls, model: CATDiffusion, tokenizer=None, **kwargs) -> CATPipeline:
        """A pipeline around a model in memory (the trainer's, the export command's)."""
        return cls(model, tokenizer, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        clip_path: str | None = None,
        dtype: str = "float32",
        *,
        param_dtype: str | None = None,
        attention: str | None = None,
        config: CATConfig | Mapping[str, Any] | None = None,
        resolution: int | None = None,
        allow_pickle: bool = False,
    ) -> CATPipeline:
        """Loads a catflax export directory, or an official CAT-Diffusion checkpoint file.

        `dtype` is the compute dtype of every part; `param_dtype` and `attention` override the
        saved ones when given. For a checkpoint file: `config` gives the sizes (default: the full
        model), `clip_path` a transformers CLIP directory for the tokenizer and any CLIP tower the
        file lacks, `resolution` the image side (default 512); `.ckpt` needs allow_pickle.
        """
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file or directory")
        over = dict(dtype=dtype, param_dtype=param_dtype, attention=attention)
        over = {k: v for k, v in over.items() if v is not None}
        if os.path.isdir(path):
            if config is not None:
                raise ValueError(f"{path}: a catflax directory has its own config; drop `config`")
            if clip_path:
                warnings.warn(
                    f"clip_path={clip_path} is not used: the catflax directory {path} has its own "
                    "CLIP towers and tokenizer", stacklevel=2,
                )  # fmt: skip
            meta = pipeline_format.read_config(path)
            cfg = pipeline_format.with_overrides(CATConfig.from_dict(meta["model"]), over)
            res = resolution or meta["resolution"]
            check_resolution(cfg, res)
            where = f"{os.path.join(path, 'config.json')}: sampling"
            sampling = sampling_config(meta.get("sampling") or {}, where)
            tokenizer = load_tokenizer(os.path.join(path, "tokenizer"))  # before the weights
            check_tokenizer(cfg, tokenizer)
            model = pipeline_format.load_directory(path, cfg)
            return cls(model, tokenizer, resolution=res, sampling=sampling)
        if config is not None and not isinstance(config, CATConfig):
            config = CATConfig.from_dict(config)
        cfg = pipeline_format.with_overrides(config or CATConfig(), over)
        check_resolution(cfg, resolution or 512)
        tokenizer = load_tokenizer(_tokenizer_dir(clip_path))  # before the weights
        state = io.read_state_dict(path, allow_pickle=allow_pickle)
        model = _load_checkpoint(path, state, cfg, clip_path, over, allow_pickle)
        return cls(model, tokenizer, resolution=resolution or 512)

    def save_pretrained(self, path: str) -> None:
        """Writes a catflax pipeline directory (`catflax.weights.pipeline_format`)."""
        sampling = dataclasses.asdict(self.sampling)
        pipeline_format.write_directory(path, self.model, self.tokenizer, self.resolution, sampling)

    # ------------------------------------------------------------------ inference
    def __call__(
        self,
        image,
        mask,
        prompt: str | Sequence[str],
        num_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | Sequence[int] = 0,
        paste_back: bool = True,
        feather: float = 0.0,
        eta: float | None = None,
    ):
        """Inpaints where the mask is white. Images/masks: PIL images, numpy arrays or paths;
        lists make a batch (a single prompt, mask or seed is shared; an int seed gives example
        i the seed `seed + i`). Returns a PIL image (a list for a batch) at the input's size.

        With `paste_back`, pixels outside the mask are the input's exactly; `feather` > 0 blurs
        the blend mask's edge over that many pixels (pixels farther out stay the input's).
        Defaults (None) come from `self.sampling` (SPEC.md §6: 50 steps, 7.5, eta 0)."""
        batched = any(isinstance(x, list | tuple) for x in (image, mask, prompt, seed))
        n = max(len(x) if isinstance(x, list | tuple) else 1 for x in (image, mask, prompt, seed))
        if isinstance(seed, numbers.Integral):
            seed = [int(seed) + i for i in range(n)]
        images, masks = _broadcast(image, n, "image"), _broadcast(mask, n, "mask")
        prompts, seeds = _broadcast(prompt, n, "prompt"), _broadcast(seed, n, "seed")
        if feather < 0:
            raise ValueError(f"feather={feather} must be >= 0")
        loaded = []
        for i, (img, m) in enumerate(zip(images, masks)):
            rgb, name = image_io.load_image(img, f"image {i}")
            m, mask_name = image_io.load_mask(m, rgb.size, f"mask {i}", name)
            loaded.append((rgb, m, name, mask_name))
        outputs: list[Image.Image | None] = [None] * n
        todo = []
        for i, (rgb, m, name, mask_name) in enumerate(loaded):
            if geometry.binary(m).any():
                todo.append(i)
                continue
            brightest = int(np.asarray(m).max())
            hint = " (a 0/1 mask? masks are 0..255, white = repaint)" if brightest == 1 else ""
            warnings.warn(
                f"{mask_name}: the mask is empty (no pixel >= 128; brightest {brightest}){hint}; "
                f"nothing to inpaint, returning {name} unchanged", image_io.InpaintWarning,
                stacklevel=2,
            )  # fmt: skip
            outputs[i] = rgb.copy()
        if todo:  # pad with the first example so that the compiled batch size stays n
            rows = todo + [todo[0]] * (n - len(todo))
            batch = self.prepare([(loaded[i][0], loaded[i][1]) for i in rows])
            for j, i in enumerate(todo):
                if not batch["mask64"][j].any():
                    warnings.warn(
                        f"{loaded[i][3]}: the mask vanishes at the model's {self.resolution} px "
                        "(its latent mask is empty): the model sees no hole and reconstructs its "
                        "input there, masked pixels black; draw a larger mask",
                        image_io.InpaintWarning, stacklevel=2,
                    )  # fmt: skip
            batch["input_ids"] = self._tokenize([prompts[i] for i in rows])
            generated = self.sample(batch, [seeds[i] for i in rows], num_steps, guidance_scale, eta)
            for j, i in enumerate(todo):
                rgb, m = loaded[i][:2]
                out = np.asarray(Image.fromarray(generated[j]).resize(rgb.size))
                if paste_back:
                    out = image_io.paste_back(np.asarray(rgb), out, np.asarray(m), feather)
                outputs[i] = Image.fromarray(out)
        return outputs if batched else outputs[0]

    def prepare(self, examples: Sequence[tuple[Image.Image, np.ndarray]]) -> dict[str, np.ndarray]:
        """SPEC.md §4 evaluation inputs of (RGB image, L mask of the same size) pairs, stacked."""
        rows = []
        for image, mask in examples:
            mask_HW = np.asarray(mask, np.uint8)
            inputs = geometry.prepare_example(image, mask_HW, np.zeros(4), self.sizes, rng=None)
            latent = self.resolution // self.vae_factor
            if latent != self.sizes.latent:  # a VAE that is not f=8 (tiny test models)
                mask_RR = Image.fromarray(inputs["mask512"]).resize((latent, latent))
                inputs["mask64"] = (np.asarray(mask_RR, np.float32) / 255.0 >= 0.5)[..., None]
            rows.append(inputs)
        keys = ("masked512", "masked224", "mask64", "mask16")
        batch = {k: np.stack([r[k] for r in rows]) for k in keys}
        batch["mask64"] = batch["mask64"].astype(np.float32)
        return batch

    def sample(
        self,
        batch: Mapping[str, np.ndarray],
        seeds: Sequence[int],
        num_steps: int | None = None,
        guidance_scale: float | None = None,
        eta: float | None = None,
        *,
        mesh: jax.sharding.Mesh | None = None,
    ) -> np.ndarray:
        """(B,R,R,3) uint8 samples from model inputs (masked512, masked224, mask64, mask16,
        input_ids; as `prepare` and the data pipeline make them), one seed per example.

        With `mesh` (a trainer's mesh over several processes, the model's parameters on it):
        `batch` and `seeds` are this process's share of one global batch split over the mesh's
        batch axes (every process the same count, a multiple of its devices along them), and
        every process gets all the samples back, in process order."""
        s = self.sampling
        num_steps = s.num_steps if num_steps is None else int(num_steps)
        guidance_scale = s.guidance_scale if guidance_scale is None else float(guidance_scale)
        eta = float(s.eta if eta is None else eta)
        B = len(batch["input_ids"])
        if len(seeds) != B or any(not 0 <= int(x) < 2**32 for x in seeds):
            raise ValueError(f"need {B} seeds in [0, 2**32), got {list(seeds)}")
        inputs = {k: np.asarray(batch[k]) for k in ("masked512", "masked224", "mask64", "mask16")}
        inputs["input_ids"] = np.asarray(batch["input_ids"], np.int32)
        inputs["empty_ids"] = np.broadcast_to(self._empty_ids, inputs["input_ids"].shape)
        inputs["seeds"] = np.asarray(seeds, np.uint32)
        if mesh is not None:
            inputs = sharding_lib.global_batch(inputs, mesh)
        images = _generate(
            self.graphdef, self.state, inputs, np.float32(guidance_scale), np.float32(eta),
            num_steps=num_steps, stochastic=eta > 0, guided=guidance_scale != 1.0,
        )  # fmt: skip
        if mesh is not None:
            return np.asarray(multihost_utils.process_allgather(images, tiled=True))
        return np.asarray(jax.device_get(images))

    def _tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        limit = self.model.config.clip_text.max_positions
        for prompt in prompts:
            count = len(self.tokenizer.tokenize(clean_text(prompt))) + 2  # with BOS and EOS
            if count > limit:
                warnings.warn(
                    f"prompt {prompt[:60]!r}... is {count} tokens; CLIP reads the first "
                    f"{limit} (with start and end), the rest is dropped",
                    image_io.InpaintWarning, stacklevel=3,
                )  # fmt: skip
        return tokenize(list(prompts), self.tokenizer, limit)


def _broadcast(x, n: int, what: str) -> list:
    if not isinstance(x, list | tuple):
        return [x] * n
    if len(x) not in (1, n):
        raise ValueError(f"got {len(x)} {what}s for a batch of {n}")
    return list(x) * (n // len(x))


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _load_checkpoint(
    path: str, state, cfg: CATConfig, clip_path: str | None, over, allow_pickle: bool = False
) -> CATDiffusion:
    """CATDiffusion from an official checkpoint's state dict (CLIP towers it lacks: clip_path)."""
    from catflax.models.clip import CLIPTextModel, CLIPVisionModel
    from catflax.models.inpainter import SemanticInpainter
    from catflax.weights import ldm

    parts = ldm.split_checkpoint(state)
    if not parts["fusion_model"]:
        raise ValueError(
            f"{path}: not a CAT-Diffusion checkpoint (no fusion_model.* keys: no semantic "
            "inpainter); a catflax export directory is a folder with config.json"
        )
    towers = {}
    for name, cls, load in (
        ("clip_text", CLIPTextModel, ldm.load_clip_text),
        ("clip_vision", CLIPVisionModel, ldm.load_clip_vision),
    ):
        if parts[name]:
            towers[name] = load(state, getattr(cfg, name), source_name=path)
        elif clip_path:
            towers[name] = cls.from_pretrained(clip_path, allow_pickle=allow_pickle, **over)
        else:
            prefix = ldm.COMPONENT_PREFIXES[name]
            raise ValueError(f"{path}: no {prefix}* keys ({name}); pass clip_path=CLIP_DIR")
    cfg = dataclasses.replace(cfg, **{n: t.config for n, t in towers.items()})
    model = abstract_module(lambda rngs: CATDiffusion(cfg, rngs=rngs))
    model.clip_text, model.clip_vision = towers["clip_text"], towers["clip_vision"]
    model.unet = ldm.load_unet(state, cfg.unet, source_name=path)[0]
    model.vae = ldm.load_vae(state, cfg.vae, source_name=path)[0]
    model.inpainter = SemanticInpainter.from_state_dict(state, cfg.inpainter, source_name=path)
    if parts["other"]:
        log.info("%s: %d keys not used (e.g. %s)", path, len(parts["other"]), min(parts["other"]))
    return model


def _tokenizer_dir(clip_path: str | None) -> str | None:
    """The tokenizer inside a CLIP directory (itself or tokenizer/); None: openai-clip's BPE."""
    if clip_path is None:
        return None
    for candidate in (clip_path, os.path.join(clip_path, "tokenizer")):
        files = (os.path.join(candidate, f) for f in ("vocab.json", "tokenizer.json"))
        if any(os.path.isfile(f) for f in files):
            return candidate
    raise FileNotFoundError(f"{clip_path}: no CLIP tokenizer (vocab.json or tokenizer.json) in it")
