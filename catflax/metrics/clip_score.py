"""CLIP score (prompt vs whole image and vs the masked-region crop) and CLIP image embeddings.

CLIP score = 100 * max(cos(text_embedding, image_embedding), 0) per example, with CLIP's
projected embeddings (Hessel et al. 2021 without their 2.5 weight; torchmetrics' CLIPScore of one
image; of a set, torchmetrics clamps the mean instead: docs/EVALUATION.md). The towers
are `catflax.models.clip`; the two projection matrices come from the same transformers
`CLIPModel` directory (`text_projection.weight`, `visual_projection.weight`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from catflax.metrics.features import map_batches
from catflax.metrics.image_sets import (
    LazyMap,
    as_sequence,
    check_float_range,
    describe_floats,
    float_values,
)
from catflax.models.clip import CLIPTextModel, CLIPVisionModel
from catflax.models.rngs import abstract_module
from catflax.preprocess import CLIP_MEAN, CLIP_STD, clip_normalize, resize_center_crop

MASK_THRESHOLD = 127  # a mask pixel > 127 is inside the region
# The range of clip_normalize's output for 0..255 input (over the three channels).
PIXEL_RANGE = (
    float(np.min(-np.asarray(CLIP_MEAN) / CLIP_STD)),
    float(np.max((1 - np.asarray(CLIP_MEAN)) / CLIP_STD)),
)


class CLIPProjections(nnx.Module):
    """CLIPModel's two bias-free projections into the joint embedding space."""

    def __init__(
        self, text_width: int, vision_width: int, projection_dim: int, *, rngs: nnx.Rngs,
        dtype: str = "float32", param_dtype: str = "float32",
    ):  # fmt: skip
        dt = dict(dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype))
        self.text_projection = nnx.Linear(
            text_width, projection_dim, use_bias=False, rngs=rngs, **dt
        )
        self.visual_projection = nnx.Linear(
            vision_width, projection_dim, use_bias=False, rngs=rngs, **dt
        )

    @classmethod
    def from_pretrained(
        cls, path: str, dtype: str = "float32", param_dtype: str = "float32",
        allow_pickle: bool = False, state: dict[str, np.ndarray] | None = None,
    ) -> CLIPProjections:  # fmt: skip
        """The projections of a transformers CLIPModel directory (`state`: its weights, if read)."""
        from catflax.weights import convert, io

        if state is None:
            state = io.read_state_dict(path, allow_pickle=allow_pickle)
        names = ("text_projection.weight", "visual_projection.weight")
        missing = [k for k in names if k not in state]
        if missing:
            raise io.WeightFileError(
                f"{path}: no {', '.join(missing)}: CLIP score needs a full CLIPModel directory "
                "(both towers and their projections), not a bare text or vision tower"
            )
        (dim, text_w), (vision_dim, vision_w) = state[names[0]].shape, state[names[1]].shape
        if dim != vision_dim:
            raise io.WeightFileError(
                f"{path}: text_projection.weight {state[names[0]].shape} and visual_projection."
                f"weight {state[names[1]].shape} project to different sizes"
            )
        dt = dict(dtype=dtype, param_dtype=param_dtype)
        abstract = abstract_module(lambda rngs: cls(text_w, vision_w, dim, rngs=rngs, **dt))
        model, _ = convert.load_state_dict(abstract, {k: state[k] for k in names}, source_name=path)
        return model


class CLIPWithProjections(nnx.Module):
    """Both towers and the projections: token ids or normalised pixels -> joint embeddings."""

    def __init__(self, text: CLIPTextModel, vision: CLIPVisionModel, projections: CLIPProjections):
        self.text, self.vision, self.projections = text, vision, projections

    def embed_text(self, token_ids_BL: jax.Array) -> jax.Array:
        _, pooled_BD = self.text(token_ids_BL)
        return self.projections.text_projection(pooled_BD).astype(jnp.float32)

    def embed_image(self, pixels_BHWC: jax.Array) -> jax.Array:
        """Embeddings of CLIP-normalised pixels (`clip_normalize` of uint8 images)."""
        check_float_range("pixels_BHWC", pixels_BHWC, *PIXEL_RANGE, " (use clip_normalize)")
        _, pooled_BD = self.vision(pixels_BHWC)
        return self.projections.visual_projection(pooled_BD).astype(jnp.float32)


def _embed_text(model: CLIPWithProjections, ids: jax.Array) -> jax.Array:
    return model.embed_text(ids)


def _embed_image(model: CLIPWithProjections, images_uint8: jax.Array) -> jax.Array:
    return model.embed_image(clip_normalize(images_uint8))


def clip_scores(text_emb_ND: np.ndarray, image_emb_ND: np.ndarray) -> np.ndarray:
    """100 * max(cos(t_i, v_i), 0) for each row pair, (N,)."""
    t = np.asarray(text_emb_ND, np.float64)
    v = np.asarray(image_emb_ND, np.float64)
    cos = np.sum(t * v, -1) / (np.linalg.norm(t, axis=-1) * np.linalg.norm(v, axis=-1))
    return 100.0 * np.maximum(cos, 0.0)


def mask_square_box(mask_HW: np.ndarray) -> tuple[int, int, int] | None:
    """(top, left, side) of the square around the mask's bounding box (mask > 127): side is the
    box's longer side, centred on the box and shifted to lie inside the image; along an axis
    shorter than the side, the image is centred in the square instead. None for an empty mask."""
    mask = np.asarray(mask_HW)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    rows, cols = np.nonzero(mask > MASK_THRESHOLD)
    if len(rows) == 0:
        return None
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = int(max(y1 - y0, x1 - x0))

    def place(lo: int, hi: int, extent: int) -> int:
        if side > extent:  # the whole axis fits in the square: centre the image on it
            return (extent - side) // 2
        return int(min(max((lo + hi - side) // 2, 0), extent - side))

    return place(y0, y1, mask.shape[0]), place(x0, x1, mask.shape[1]), side


def crop_to_mask(image_HWC: np.ndarray, mask_HW: np.ndarray, fill: int = 0) -> np.ndarray | None:
    """The square crop of `mask_square_box` (parts outside the image, only when the box is longer
    than the image's short side, filled with `fill`); None for an empty mask."""
    box = mask_square_box(mask_HW)
    return None if box is None else crop_square(image_HWC, box, fill)


def crop_square(image_HWC: np.ndarray, box: tuple[int, int, int], fill: int = 0) -> np.ndarray:
    """The (top, left, side) square of `mask_square_box`, filled with `fill` outside the image."""
    top, left, side = box
    image = np.asarray(image_HWC)
    padded = np.pad(image, ((side, side), (side, side), (0, 0)), constant_values=fill)
    return padded[top + side : top + 2 * side, left + side : left + 2 * side]


class CLIPScorer:
    """CLIP embeddings and scores on the host: prompts and uint8 images in, numpy out."""

    def __init__(self, model: CLIPWithProjections, tokenizer=None, batch_size: int = 32):
        from catflax.tokenizer import load_tokenizer

        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
        self.batch_size = batch_size
        self.image_size = model.vision.config.image_size
        self.max_length = model.text.config.max_positions

    @classmethod
    def from_pretrained(
        cls, path: str, dtype: str = "float32", allow_pickle: bool = False,
        tokenizer_path: str | None = None, batch_size: int = 32,
    ) -> CLIPScorer:  # fmt: skip
        """Towers and projections from a transformers CLIPModel directory; the tokenizer from
        `tokenizer_path`, else from the directory when it has one (`find_tokenizer_dir`: either
        file set, here or in tokenizer/), else openai-clip's BPE."""
        from catflax.tokenizer import find_tokenizer_dir, load_tokenizer
        from catflax.weights import io

        text = CLIPTextModel.from_pretrained(path, dtype=dtype, allow_pickle=allow_pickle)
        vision = CLIPVisionModel.from_pretrained(path, dtype=dtype, allow_pickle=allow_pickle)
        state = io.read_state_dict(path, allow_pickle=allow_pickle)
        projections = CLIPProjections.from_pretrained(path, dtype=dtype, state=state)
        if tokenizer_path is None:
            tokenizer_path = find_tokenizer_dir(path)
        model = CLIPWithProjections(text, vision, projections)
        return cls(model, load_tokenizer(tokenizer_path), batch_size)

    def embed_token_ids(self, token_ids_NL: np.ndarray) -> np.ndarray:
        """Projected text embeddings (N, P) of token ids (N, L)."""
        return map_batches(self.model, _embed_text, np.asarray(token_ids_NL), self.batch_size)

    def embed_prompts(self, prompts: Sequence[str]) -> np.ndarray:
        """Projected text embeddings (N, P); prompts tokenised and truncated like the model's."""
        from catflax.tokenizer import tokenize

        ids = tokenize(list(prompts), self.tokenizer, max_length=self.max_length)
        return self.embed_token_ids(ids)

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 (H,W,3) images -> (N, S, S, 3) uint8: bicubic short side to S, centre crop.
        Float images are refused (those in [0, 1] would be 255 times too dark)."""
        arrays = [np.asarray(im) for im in images]
        for im in arrays:
            seen = float_values(im)
            if seen is not None:
                raise ValueError(
                    f"images: {describe_floats(seen)}; expected uint8 0..255 (CLIPScorer takes "
                    "uint8 images: round 0..255 floats, or 255 * [0, 1] floats, to uint8)"
                )
        return np.stack([resize_center_crop(Image.fromarray(im), self.image_size) for im in arrays])

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Projected image embeddings (N, P), not normalised, of uint8 RGB images (any sizes),
        preprocessed one batch at a time."""
        return map_batches(self.model, _embed_image, as_sequence(images), self.batch_size,
                           prepare=self.preprocess)  # fmt: skip

    def scores(
        self,
        prompts: Sequence[str],
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray] | None = None,
        image_embeddings: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Per example (N,): `clip_score` of prompt vs whole image and, with masks, `clip_score_
        crop` of prompt vs the square crop around the mask (NaN where a mask is empty).
        `image_embeddings`: `embed_images(images)` where already computed."""
        images = as_sequence(images)
        masks = None if masks is None else as_sequence(masks)
        if len(prompts) != len(images) or (masks is not None and len(masks) != len(images)):
            raise ValueError(
                f"need one prompt and one mask per image: {len(prompts)} prompts, {len(images)} "
                f"images, {'no' if masks is None else len(masks)} masks"
            )
        text = self.embed_prompts(prompts)
        if image_embeddings is None:
            image_embeddings = self.embed_images(images)
        elif len(image_embeddings) != len(images):
            raise ValueError(f"{len(image_embeddings)} image embeddings for {len(images)} images")
        out = {"clip_score": clip_scores(text, image_embeddings)}
        if masks is not None:  # crops made a batch at a time, as they are embedded
            boxes = [mask_square_box(m) for m in masks]
            has = np.array([b is not None for b in boxes])
            crop_scores = np.full(len(images), np.nan)
            if has.any():
                crops = LazyMap(lambda i: crop_square(images[i], boxes[i]), np.flatnonzero(has))
                crop_scores[has] = clip_scores(text[has], self.embed_images(crops))
            out["clip_score_crop"] = crop_scores
        return out
