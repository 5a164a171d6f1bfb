"""The semantic inpainter (SPEC.md §3): CLIP features of the masked image -> those of the whole.

Module and parameter names mirror the reference's `VisionFusionTransformer` so the official
checkpoint's `fusion_model.*` keys map one to one (`embeddings.mask_embedding`,
`encoder.layers.N.self_attn.q_proj`, `spatial_mlp.fc1`, ...). Also here: the semantic tokens the
UNet attends to (stage 2 / inference and the stage-1b teacher version), the patch-mask rule and
the distillation loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from catflax.models.clip import CLIPEncoder
from catflax.models.layers import activation, layer_norm, torch_linear
from catflax.models.rngs import abstract_module

CHECKPOINT_PREFIX = "fusion_model."  # where the official CAT-Diffusion checkpoint keeps it


@dataclasses.dataclass(frozen=True)
class InpainterConfig:
    """Sizes of the semantic inpainter; defaults are the full model (CLIP ViT-L/14 features)."""

    hidden_size: int = 1024  # = CLIP vision width: patch tokens are added to the embeddings
    intermediate_size: int = 4096  # encoder MLP
    num_layers: int = 24
    num_heads: int = 16
    grid_size: int = 16  # patch grid side: 16x16 = 256 patch tokens
    label_size: int = 768  # width of the pooled CLIP text output
    label_intermediate_size: int = 3072
    spatial_intermediate_size: int = 4096
    global_intermediate_size: int = 4096
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    attention: str = "xla"  # xla | cudnn | chunked | splash (TPU)
    remat: bool = False
    remat_policy: str = "full"  # with remat: "full" | "dots" (layers.REMAT_POLICIES)

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


class InpainterOutput(NamedTuple):
    pred_spatial: jax.Array  # (B,P,D) predicted patch features, no norm
    pred_global: jax.Array  # (B,D) predicted pooled feature (post-LN of the global token)
    label_out: jax.Array  # (B,D) the label token's output


def _dtypes(cfg: InpainterConfig) -> dict[str, Any]:
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


class InpainterEmbeddings(nnx.Module):
    """patch tokens + position embedding + embedding of the patch's mask bit (both tables
    initialised N(0, 1), as PyTorch's nn.Embedding in the reference)."""

    def __init__(self, cfg: InpainterConfig, *, rngs: nnx.Rngs):
        dt = dict(_dtypes(cfg), embedding_init=nnx.initializers.normal(1.0))
        self.position_embedding = nnx.Embed(cfg.num_patches, cfg.hidden_size, rngs=rngs, **dt)
        self.mask_embedding = nnx.Embed(2, cfg.hidden_size, rngs=rngs, **dt)

    def __call__(self, patch_tokens_BPD: jax.Array, mask_BP: jax.Array) -> jax.Array:
        positions = self.position_embedding(jnp.arange(patch_tokens_BPD.shape[1]))
        return patch_tokens_BPD + positions[None] + self.mask_embedding(mask_BP)


class InpainterMLP(nnx.Module):
    """fc1 -> activation -> fc2, with its own input and output widths (PyTorch's nn.Linear
    initialisation)."""

    def __init__(self, d_in: int, hidden: int, d_out: int, act: str, *, rngs: nnx.Rngs, **dt):
        self.act = activation(act)
        self.fc1 = torch_linear(d_in, hidden, rngs=rngs, **dt)
        self.fc2 = torch_linear(hidden, d_out, rngs=rngs, **dt)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class SemanticInpainter(nnx.Module):
    """(masked-image CLIP features, patch mask, prompt label) -> predicted unmasked features."""

    def __init__(self, cfg: InpainterConfig, *, rngs: nnx.Rngs):
        if cfg.grid_size % 2:
            raise ValueError(f"InpainterConfig.grid_size={cfg.grid_size} must be even (2x2 pool)")
        self.config = cfg
        dt, width = _dtypes(cfg), cfg.hidden_size
        self.embeddings = InpainterEmbeddings(cfg, rngs=rngs)
        self.encoder = CLIPEncoder(cfg, rngs=rngs)
        self.post_layernorm = layer_norm(width, cfg.layer_norm_eps, rngs=rngs, **dt)
        act = cfg.hidden_act
        self.label_mlp = InpainterMLP(
            cfg.label_size, cfg.label_intermediate_size, width, act, rngs=rngs, **dt
        )
        self.spatial_mlp = InpainterMLP(
            width, cfg.spatial_intermediate_size, width, act, rngs=rngs, **dt
        )
        self.global_mlp = InpainterMLP(
            width, cfg.global_intermediate_size, width, act, rngs=rngs, **dt
        )

    def __call__(
        self,
        clip_masked_BLD: jax.Array,
        mask16_BGG: jax.Array,
        label_BE: jax.Array,
        global_masked_BD: jax.Array,
    ) -> InpainterOutput:
        """clip_masked: teacher last hidden state (B,1+P,D), CLS first (dropped here); mask16:
        (B,G,G) or (B,P), nonzero = masked; label: pooled text (B,E); global_masked: (B,D)."""
        cfg = self.config
        patch_tokens_BPD = patch_tokens(clip_masked_BLD, cfg.grid_size, "clip_masked")
        if mask16_BGG.shape[1:] != (cfg.num_patches,):  # (B,G,G), or already flat (B,P)
            _check_shape("mask16", mask16_BGG, (cfg.grid_size, cfg.grid_size))
        _check_shape("label", label_BE, (cfg.label_size,))
        _check_shape("global_masked", global_masked_BD, (cfg.hidden_size,))
        dtype = jnp.dtype(cfg.dtype)
        mask_BP = (mask16_BGG != 0).astype(jnp.int32).reshape(mask16_BGG.shape[0], -1)

        h_BPD = self.embeddings(patch_tokens_BPD.astype(dtype), mask_BP)
        glob_BD = self.global_mlp(global_masked_BD.astype(dtype))
        label_BD = self.label_mlp(label_BE.astype(dtype))
        seq_BLD = jnp.concatenate([glob_BD[:, None], self.spatial_mlp(h_BPD), label_BD[:, None]], 1)
        out_BLD = self.encoder(seq_BLD)  # no causal mask, no input layernorm
        return InpainterOutput(
            pred_spatial=out_BLD[:, 1:-1],
            pred_global=self.post_layernorm(out_BLD[:, 0]),
            label_out=out_BLD[:, -1],
        )

    def predict_tokens(
        self, clip_masked_BLD, mask16_BGG, label_BE, global_masked_BD
    ) -> tuple[jax.Array, InpainterOutput]:
        """The UNet's semantic tokens for stage 2 / inference (B,(G/2)^2,D), and the raw outputs."""
        out = self(clip_masked_BLD, mask16_BGG, label_BE, global_masked_BD)
        patches = patch_tokens(clip_masked_BLD, self.config.grid_size, "clip_masked")
        return semantic_tokens(out.pred_spatial, patches, mask16_BGG), out

    # ------------------------------------------------------------------ weights
    @classmethod
    def from_state_dict(
        cls,
        state: Mapping[str, np.ndarray],
        config: InpainterConfig | None = None,
        *,
        prefix: str = CHECKPOINT_PREFIX,
        source_name: str = "state dict",
        place: Callable | None = None,
    ) -> SemanticInpainter:
        """Strictly loads the keys under `prefix` (other keys are ignored; "" takes them all)."""
        from catflax.weights import convert

        config = config or InpainterConfig()
        own = {k: v for k, v in state.items() if k.startswith(prefix)}
        if not own:
            raise convert.WeightLoadError(
                source_name, missing=[f"{prefix}* (no key starts with {prefix!r})"]
            )
        own.pop(f"{prefix}embeddings.position_ids", None)  # a non-persistent buffer in torch
        abstract = abstract_module(lambda rngs: cls(config, rngs=rngs))
        model, _ = convert.load_state_dict(
            abstract, own, source_name=source_name, rename=lambda k: prefix + k, place=place
        )
        return model

    @classmethod
    def from_checkpoint(
        cls,
        path: str,
        config: InpainterConfig | None = None,
        *,
        prefix: str = CHECKPOINT_PREFIX,
        allow_pickle: bool = False,
    ) -> SemanticInpainter:
        """Loads from a weight file or directory (the official `.ckpt` needs allow_pickle=True)."""
        from catflax.weights import io

        state = io.read_state_dict(path, allow_pickle=allow_pickle)
        return cls.from_state_dict(state, config, prefix=prefix, source_name=path)

    def state_dict(self, prefix: str = CHECKPOINT_PREFIX) -> dict[str, np.ndarray]:
        """Our parameters under the reference's names (inverse of `from_state_dict`)."""
        from catflax.weights import convert

        return convert.export_state_dict(self, rename=lambda k: prefix + k)


def _check_shape(name: str, x: jax.Array, trailing: tuple[int, ...]) -> None:
    if x.ndim != 1 + len(trailing) or tuple(x.shape[1:]) != trailing:
        raise ValueError(
            f"{name}: expected shape (B, {', '.join(map(str, trailing))}), got {x.shape}"
        )


def patch_tokens(clip_hidden_BLD: jax.Array, grid_size: int, name: str = "clip_hidden"):
    """The patch tokens (B,P,D) of a CLIP vision last hidden state (B,1+P,D): CLS dropped."""
    if clip_hidden_BLD.ndim != 3 or clip_hidden_BLD.shape[1] != 1 + grid_size**2:
        raise ValueError(
            f"{name}: expected a CLIP last hidden state (B, {1 + grid_size**2}, D) with the CLS "
            f"token first, got {clip_hidden_BLD.shape}"
        )
    return clip_hidden_BLD[:, 1:]


# ---------------------------------------------------------------------- semantic tokens
def pool_2x2(tokens_BPD: jax.Array) -> jax.Array:
    """2x2 average pool of a row-major square token grid: (B,G*G,D) -> (B,(G/2)^2,D)."""
    B, P, D = tokens_BPD.shape
    G = round(P**0.5)
    if G * G != P or G % 2:
        raise ValueError(f"pool_2x2: {P} tokens are not an even square grid")
    grid = tokens_BPD.reshape(B, G // 2, 2, G // 2, 2, D)
    return grid.mean(axis=(2, 4)).reshape(B, (G // 2) ** 2, D)


def semantic_tokens(
    pred_spatial_BPD: jax.Array, patch_tokens_BPD: jax.Array, mask16_BGG: jax.Array
) -> jax.Array:
    """Stage 2 / inference tokens: prediction where masked, teacher features elsewhere, pooled."""
    B, P, D = pred_spatial_BPD.shape
    if patch_tokens_BPD.shape != (B, P, D) or mask16_BGG.size != B * P:
        raise ValueError(
            f"semantic_tokens: pred_spatial {pred_spatial_BPD.shape}, patch_tokens "
            f"{patch_tokens_BPD.shape} and mask16 {mask16_BGG.shape} do not agree"
        )
    mask_BP1 = (mask16_BGG != 0).reshape(B, P, 1).astype(pred_spatial_BPD.dtype)
    blended = mask_BP1 * pred_spatial_BPD + (1 - mask_BP1) * patch_tokens_BPD
    return pool_2x2(blended)


def teacher_tokens(clip_unmasked_BLD: jax.Array) -> jax.Array:
    """Stage 1b tokens: the unmasked image's CLIP last hidden state, CLS dropped, 2x2 pooled."""
    return pool_2x2(clip_unmasked_BLD[:, 1:])


def mask16_from_mask224(mask_HW: np.ndarray, grid_size: int = 16) -> np.ndarray:
    """Patch mask (..., G, G) of a 0..255 square mask (..., S, S): a patch is True if any of its
    pixels has round(value/255) >= 1 (numpy rounding, as the reference's `patchify_mask`)."""
    mask = np.asarray(mask_HW, dtype=np.float64)
    if mask.ndim < 2 or mask.shape[-1] != mask.shape[-2] or mask.shape[-1] % grid_size:
        raise ValueError(
            f"mask16_from_mask224: expected a square mask (..., S, S) with S divisible by "
            f"{grid_size}, got shape {mask.shape}"
        )
    step = mask.shape[-1] // grid_size
    blocks = np.round(mask / 255.0).reshape(*mask.shape[:-2], grid_size, step, grid_size, step)
    return blocks.sum(axis=(-3, -1)) > 0


# ---------------------------------------------------------------------- distillation
def distillation_loss(
    out: InpainterOutput,
    clip_unmasked_BLD: jax.Array,
    pooled_unmasked_BD: jax.Array,
    mask16_BGG: jax.Array,
    masked_only: bool = False,
    weights_B: jax.Array | None = None,
    group_size: int = 0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Stage 1a loss (SPEC.md §5): spatial + global. The reference's spatial numerator sums every
    patch (default); `masked_only=True` sums only masked patches, as the paper describes.
    `weights_B` (validation: 0 for padding) weights each example; all ones is the plain loss.
    `group_size` > 0 computes the loss per group of that many examples and averages the groups,
    as the reference's data-parallel GPUs did (each normalised by its own masked patches)."""
    target_BPD = clip_unmasked_BLD[:, 1:].astype(jnp.float32)
    mask_BP = (mask16_BGG != 0).reshape(target_BPD.shape[:2]).astype(jnp.float32)
    per_patch_BP = jnp.mean((out.pred_spatial.astype(jnp.float32) - target_BPD) ** 2, axis=-1)
    diff = out.pred_global.astype(jnp.float32) - pooled_unmasked_BD.astype(jnp.float32)
    per_example_B = jnp.mean(diff**2, axis=-1)
    if weights_B is not None:
        w_B = weights_B.astype(jnp.float32)
        mask_BP, per_patch_BP = w_B[:, None] * mask_BP, w_B[:, None] * per_patch_BP
        per_example_B = w_B * per_example_B
    if masked_only:
        per_patch_BP = per_patch_BP * mask_BP
    if group_size:
        if weights_B is not None:
            raise ValueError("distillation_loss: weights_B and group_size do not combine")
        groups = split_groups(per_example_B.shape[0], group_size)
        per_patch_GP = per_patch_BP.reshape(groups, -1)
        spatial = jnp.mean(per_patch_GP.sum(-1) / (mask_BP.reshape(groups, -1).sum(-1) + 1.0))
        glob = jnp.mean(per_example_B)
        return spatial + glob, {"spatial_loss": spatial, "global_loss": glob}
    count = per_example_B.shape[0] if weights_B is None else jnp.maximum(w_B.sum(), 1.0)
    spatial = per_patch_BP.sum() / (mask_BP.sum() + 1.0)
    glob = per_example_B.sum() / count
    return spatial + glob, {"spatial_loss": spatial, "global_loss": glob}


def split_groups(batch: int, group_size: int) -> int:
    """The number of groups of `group_size` examples in a batch of `batch` (which it divides)."""
    if group_size < 1 or batch % group_size:
        raise ValueError(f"group_size={group_size} does not divide the batch of {batch}")
    return batch // group_size
