"""InceptionV3 for FID, matching pytorch-fid's `fid_inception_v3` (the TF FID graph, 2015-12-05).

Module and parameter names mirror torchvision's `Inception3` as patched by pytorch-fid, so the
standard `pt_inception-2015-12-05-6726825d.pth` state dict maps one to one (`Mixed_5b.branch1x1.
conv.weight`, `...bn.running_var`, `fc.weight`). The FID-specific differences from torchvision's
network: average pools in the A/C/E blocks ignore padding (count_include_pad=False), and the last
E block (`Mixed_7c`) max-pools in its pool branch. Images are NHWC.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from catflax.metrics.image_sets import check_float_range
from catflax.models.rngs import abstract_module

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FEATURE_DIM = 2048
MIN_INPUT_SIZE = 75  # smaller inputs shrink to nothing before Mixed_7a


@dataclasses.dataclass(frozen=True)
class InceptionConfig:
    """Options of the FID InceptionV3; the network's sizes are fixed by the weights."""

    resize_to: int | None = 299  # bilinear resize (PyTorch's, no antialias) before the net
    num_classes: int = 1008  # the TF graph's logits layer, `fc` in the state dict
    bn_eps: float = 1e-3
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    precision: str = "highest"  # of convolutions and matmuls; "default" is faster on TPU


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class FrozenBatchNorm(nnx.Module):
    """Inference BatchNorm with PyTorch's parameter names; the running statistics are Params
    because they are frozen weights here, never updated."""

    def __init__(self, features: int, eps: float, *, param_dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype))
        self.running_mean = nnx.Param(jnp.zeros((features,), param_dtype))
        self.running_var = nnx.Param(jnp.ones((features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.weight[...] * jax.lax.rsqrt(self.running_var[...] + self.eps)
        shift = self.bias[...] - self.running_mean[...] * scale
        return x * scale.astype(x.dtype) + shift.astype(x.dtype)


class BasicConv2d(nnx.Module):
    """conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU."""

    def __init__(self, cin, cout, kernel, cfg: InceptionConfig, *, stride=1, padding=0, rngs):
        ph, pw = _pair(padding)
        self.conv = nnx.Conv(
            cin, cout, _pair(kernel), strides=_pair(stride), padding=((ph, ph), (pw, pw)),
            use_bias=False, precision=cfg.precision, dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs,
        )  # fmt: skip
        self.bn = FrozenBatchNorm(cout, cfg.bn_eps, param_dtype=jnp.dtype(cfg.param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


_SAME_3x3 = ((1, 1), (1, 1))


def avg_pool_3x3_same(x: jax.Array) -> jax.Array:
    """TF's 3x3/1 'SAME' average pool: padded positions are not counted."""
    return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=_SAME_3x3, count_include_pad=False)


def max_pool_3x3_same(x: jax.Array) -> jax.Array:
    return nnx.max_pool(x, (3, 3), strides=(1, 1), padding=_SAME_3x3)


def max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
    return nnx.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nnx.Module):
    def __init__(self, cin: int, pool_features: int, cfg: InceptionConfig, *, rngs: nnx.Rngs):
        conv = partial(BasicConv2d, cfg=cfg, rngs=rngs)
        self.branch1x1 = conv(cin, 64, 1)
        self.branch5x5_1 = conv(cin, 48, 1)
        self.branch5x5_2 = conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = conv(cin, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, padding=1)
        self.branch_pool = conv(cin, pool_features, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = self.branch_pool(avg_pool_3x3_same(x))
        return jnp.concatenate([self.branch1x1(x), b5, b3, pool], axis=-1)


class InceptionB(nnx.Module):
    """Grid reduction 35 -> 17."""

    def __init__(self, cin: int, cfg: InceptionConfig, *, rngs: nnx.Rngs):
        conv = partial(BasicConv2d, cfg=cfg, rngs=rngs)
        self.branch3x3 = conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = conv(cin, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nnx.Module):
    """Factorised 7x7 block."""

    def __init__(self, cin: int, channels_7x7: int, cfg: InceptionConfig, *, rngs: nnx.Rngs):
        conv, c7 = partial(BasicConv2d, cfg=cfg, rngs=rngs), channels_7x7
        self.branch1x1 = conv(cin, 192, 1)
        self.branch7x7_1 = conv(cin, c7, 1)
        self.branch7x7_2 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = conv(cin, c7, 1)
        self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = conv(cin, 192, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):  # fmt: skip
            bd = layer(bd)
        pool = self.branch_pool(avg_pool_3x3_same(x))
        return jnp.concatenate([self.branch1x1(x), b7, bd, pool], axis=-1)


class InceptionD(nnx.Module):
    """Grid reduction 17 -> 8."""

    def __init__(self, cin: int, cfg: InceptionConfig, *, rngs: nnx.Rngs):
        conv = partial(BasicConv2d, cfg=cfg, rngs=rngs)
        self.branch3x3_1 = conv(cin, 192, 1)
        self.branch3x3_2 = conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = conv(cin, 192, 1)
        self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = conv(192, 192, 3, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return jnp.concatenate([b3, b7, max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nnx.Module):
    """Expanded-filter block; `pool` is "avg" for Mixed_7b and "max" for Mixed_7c (FID graph)."""

    def __init__(self, cin: int, pool: str, cfg: InceptionConfig, *, rngs: nnx.Rngs):
        conv = partial(BasicConv2d, cfg=cfg, rngs=rngs)
        if pool not in ("avg", "max"):
            raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {pool!r}")
        self.pool_kind = pool
        self.branch1x1 = conv(cin, 320, 1)
        self.branch3x3_1 = conv(cin, 384, 1)
        self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = conv(cin, 448, 1)
        self.branch3x3dbl_2 = conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = conv(cin, 192, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_1(x)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = avg_pool_3x3_same(x) if self.pool_kind == "avg" else max_pool_3x3_same(x)
        return jnp.concatenate(
            [
                self.branch1x1(x),
                self.branch3x3_2a(b3),
                self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(bd),
                self.branch3x3dbl_3b(bd),
                self.branch_pool(pooled),
            ],
            axis=-1,
        )


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of PyTorch's bilinear interpolation, align_corners=False, no antialias.

    Source positions are rounded to float32 as PyTorch's CPU kernel rounds them for float32
    images (a fused multiply-add: one rounding of scale * (i + 0.5) - 0.5)."""
    f32 = np.float32
    scale = np.float64(f32(in_size) / f32(out_size))
    centres = (np.arange(out_size, dtype=f32) + f32(0.5)).astype(np.float64)
    src = np.maximum((scale * centres - 0.5).astype(f32), f32(0))
    lo = np.minimum(src.astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = np.clip(src - lo.astype(f32), f32(0), f32(1)).astype(np.float64)
    weights = np.zeros((out_size, in_size), np.float64)
    np.add.at(weights, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(weights, (np.arange(out_size), hi), frac)
    return weights


def resize_bilinear(images_BHWC, size: int | tuple[int, int], precision: str = "highest"):
    """`F.interpolate(x, size, mode="bilinear", align_corners=False)` on NHWC images; numpy in,
    numpy out (float64 weights), jax in, jax out."""
    out_h, out_w = _pair(size)
    _, h, w, _ = images_BHWC.shape
    rows, cols = bilinear_matrix(h, out_h), bilinear_matrix(w, out_w)
    if isinstance(images_BHWC, jax.Array):
        x = images_BHWC
        dt = x.dtype
        return jnp.einsum(
            "oh,bhwc,pw->bopc", rows.astype(dt), x, cols.astype(dt), precision=precision
        )
    x = np.asarray(images_BHWC)
    return np.einsum("oh,bhwc,pw->bopc", rows, x, cols, optimize=True).astype(x.dtype)


class InceptionV3(nnx.Module):
    """FID InceptionV3: RGB images in [0, 1], (B,H,W,3) -> pool3 features (B,2048) in float32.

    With `cfg.resize_to` set, inputs are first resized bilinearly to that square size, as
    pytorch-fid does (299); without it, any size from 75 px up runs as is.
    """

    def __init__(self, cfg: InceptionConfig = InceptionConfig(), *, rngs: nnx.Rngs):
        self.config = cfg
        conv = partial(BasicConv2d, cfg=cfg, rngs=rngs)
        self.Conv2d_1a_3x3 = conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = conv(32, 32, 3)
        self.Conv2d_2b_3x3 = conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = conv(64, 80, 1)
        self.Conv2d_4a_3x3 = conv(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32, cfg, rngs=rngs)
        self.Mixed_5c = InceptionA(256, 64, cfg, rngs=rngs)
        self.Mixed_5d = InceptionA(288, 64, cfg, rngs=rngs)
        self.Mixed_6a = InceptionB(288, cfg, rngs=rngs)
        self.Mixed_6b = InceptionC(768, 128, cfg, rngs=rngs)
        self.Mixed_6c = InceptionC(768, 160, cfg, rngs=rngs)
        self.Mixed_6d = InceptionC(768, 160, cfg, rngs=rngs)
        self.Mixed_6e = InceptionC(768, 192, cfg, rngs=rngs)
        self.Mixed_7a = InceptionD(768, cfg, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, "avg", cfg, rngs=rngs)
        self.Mixed_7c = InceptionE(2048, "max", cfg, rngs=rngs)
        self.fc = nnx.Linear(
            FEATURE_DIM, cfg.num_classes, precision=cfg.precision, dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs,
        )  # fmt: skip

    def __call__(self, images_BHWC: jax.Array) -> jax.Array:
        if not jnp.issubdtype(jnp.result_type(images_BHWC), jnp.floating):
            raise ValueError(  # uint8 taken as it is would be 255 times too bright
                f"InceptionV3 takes float images in [0, 1], got {jnp.result_type(images_BHWC)} "
                "(inception_features converts uint8 images)"
            )
        check_float_range("images_BHWC", images_BHWC, 0.0, 1.0, " (divide uint8 images by 255)")
        x = jnp.asarray(images_BHWC, jnp.float32)
        if x.shape[-1] != 3:
            raise ValueError(f"InceptionV3 expects RGB images (B,H,W,3), got shape {x.shape}")
        if self.config.resize_to is not None:
            x = resize_bilinear(x, self.config.resize_to, self.config.precision)
        if min(x.shape[1:3]) < MIN_INPUT_SIZE:
            raise ValueError(
                f"InceptionV3 needs images of at least {MIN_INPUT_SIZE} px, got {x.shape[1:3]} "
                "(set resize_to, e.g. 299 as pytorch-fid does)"
            )
        x = (2.0 * x - 1.0).astype(jnp.dtype(self.config.dtype))  # [0,1] -> [-1,1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = max_pool_3x3_stride2(x)
        x = max_pool_3x3_stride2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):  # fmt: skip
            x = block(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # pool3, (B, 2048)

    def logits(self, features_BD: jax.Array) -> jax.Array:
        """The TF graph's 1008-way logits from pool3 features (for Inception Score)."""
        return self.fc(features_BD.astype(jnp.dtype(self.config.dtype))).astype(jnp.float32)

    @classmethod
    def from_pretrained(
        cls, path: str, allow_pickle: bool = False, place=None, **overrides
    ) -> InceptionV3:
        """Loads the FID weights from `pt_inception-2015-12-05-6726825d.pth` (a pickle: only
        with allow_pickle=True and torch installed) or a .safetensors conversion of it."""
        from catflax.weights import convert

        cfg = InceptionConfig(**overrides)
        state = read_fid_state_dict(path, allow_pickle=allow_pickle)
        abstract = abstract_module(lambda rngs: cls(cfg, rngs=rngs))
        model, _ = convert.load_state_dict(abstract, state, source_name=path, place=place)
        return model


def read_fid_state_dict(path: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """The FID Inception state dict of `path`, without BatchNorm's `num_batches_tracked`
    counters; a file of torchvision's ImageNet Inception is refused with a clear error."""
    from catflax.weights.io import WeightFileError, read_state_dict

    if os.path.isdir(path):
        raise WeightFileError(
            f"{path}: expected the FID Inception weight file ({FID_WEIGHTS_NAME} or a "
            ".safetensors conversion of it), got a directory"
        )
    state = read_state_dict(path, allow_pickle=allow_pickle)
    state = {k: v for k, v in state.items() if not k.endswith(".num_batches_tracked")}
    if any(k.startswith("AuxLogits.") for k in state) or (
        "fc.weight" in state and state["fc.weight"].shape[0] == 1000
    ):
        raise WeightFileError(
            f"{path}: these look like torchvision's ImageNet inception_v3 weights (AuxLogits / "
            f"1000 classes); FID needs the TF FID graph's weights, {FID_WEIGHTS_NAME}"
        )
    if not state or "Conv2d_1a_3x3.conv.weight" not in state:
        some = ", ".join(sorted(state)[:5])
        raise WeightFileError(
            f"{path}: not an FID Inception state dict (no Conv2d_1a_3x3.conv.weight; "
            f"keys start {some or 'nowhere: the file is empty'})"
        )
    return state


def check_file_hash(path: str) -> str:
    """Sha256 of `path`; raises if the name carries torch hub's hash prefix (`-6726825d.pth`)
    and the content does not match it. Returns the hex digest."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    hexdigest = digest.hexdigest()
    m = re.search(r"-([0-9a-f]{8,})\.[A-Za-z]+$", os.path.basename(path))
    if m and not hexdigest.startswith(m.group(1)):
        from catflax.weights.io import WeightFileError

        raise WeightFileError(
            f"{path}: sha256 {hexdigest[:16]}... does not start with the {m.group(1)} its name "
            "promises; the download is corrupt or a different file"
        )
    return hexdigest
