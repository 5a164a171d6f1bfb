"""Mapping between NNX parameters and PyTorch-style state dicts, strict in both directions.

Our modules mirror the PyTorch module tree, so a parameter's PyTorch name follows from its path
and the type of the module that owns it (Linear/Conv kernels are transposed, norms' `scale` is
`weight`). A per-format `rename` turns that name into the source's own (e.g. `ref_attn` into
the reference's `attn3`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Path = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class SourceName:
    """Where one of our parameters lives in a PyTorch-style state dict."""

    key: str
    layout: str  # "linear" (out,in), "conv" (out,in,h,w) or "plain"


class WeightLoadError(ValueError):
    """A state dict does not match the model: keys missing, unexpected or mis-shaped."""

    def __init__(self, source: str, missing=(), unexpected=(), mismatched=()):
        self.missing, self.unexpected, self.mismatched = (
            list(missing),
            list(unexpected),
            list(mismatched),
        )
        parts = [f"{source}: weights do not match the model"]
        shards = _shard_of_keys(source)

        def in_shard(item: str) -> str:  # "key[: shapes]" -> "... [shard file]" where known
            shard = _find_shard(item.split(": ")[0], shards)
            return f"{item} [{shard}]" if shard else item

        for title, items in (
            ("missing keys", self.missing),
            ("unexpected keys", [in_shard(k) for k in self.unexpected]),
            ("mis-shaped keys (key: file shape vs expected)", list(map(in_shard, self.mismatched))),
        ):
            if items:
                shown = ", ".join(items[:25]) + (
                    f", ... ({len(items)} in all)" if len(items) > 25 else ""
                )
                parts.append(f"{len(items)} {title}: {shown}")
        super().__init__("\n  ".join(parts))


def _shard_of_keys(source: str) -> dict[str, str]:
    """{key: shard file} when `source` is a folder with a sharded checkpoint, else {}."""
    from catflax.weights import io

    return io.shard_of_keys(source) if isinstance(source, str) else {}


def _find_shard(key: str, shards: dict[str, str]) -> str | None:
    """The shard of `key`, also when a loader added or removed a prefix such as
    `text_model.` (transformers 5 saves CLIP towers without it)."""
    if key in shards:
        return shards[key]
    parts = key.split(".")
    for start in range(1, len(parts)):
        if (suffix := ".".join(parts[start:])) in shards:
            return shards[suffix]
    return next((s for k, s in shards.items() if k.endswith("." + key)), None)


@dataclasses.dataclass
class LoadReport:
    """What a load did: keys read, and our parameters that were freshly initialised."""

    loaded: list[str]
    initialised: list[str]

    def summary(self) -> str:
        s = f"loaded {len(self.loaded)} tensors"
        if self.initialised:
            s += f"; freshly initialised {len(self.initialised)}: {', '.join(self.initialised)}"
        return s


def path_str(path: Path) -> str:
    return ".".join(str(p) for p in path)


def torch_names(
    model: nnx.Module, rename: Callable[[str], str] | None = None
) -> dict[Path, SourceName]:
    """The PyTorch-style name and layout of every nnx.Param of `model` (abstract or concrete)."""
    owners = {path: type(m) for path, m in nnx.iter_modules(model)}
    names = {}
    for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        owner_path, leaf = path[:-1], path[-1]
        owner = owners.get(owner_path, nnx.Module)
        name, layout = leaf, "plain"
        if leaf == "kernel" and issubclass(owner, nnx.Linear):
            name, layout = "weight", "linear"
        elif leaf == "kernel" and issubclass(owner, nnx.Conv):
            name, layout = "weight", "conv"
        elif leaf == "scale" and issubclass(owner, (nnx.LayerNorm, nnx.GroupNorm, nnx.RMSNorm)):
            name = "weight"
        elif leaf == "embedding" and issubclass(owner, nnx.Embed):
            name = "weight"
        key = ".".join([*(str(p) for p in owner_path), str(name)])
        names[path] = SourceName(rename(key) if rename else key, layout)
    return names


def to_ours(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return array.T
    if layout == "conv":
        return array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    return array


def to_torch(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return array.T
    if layout == "conv":
        return array.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    return array


def expected_source_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    return tuple(to_torch(np.empty(shape, dtype=np.bool_), layout).shape)


def load_state_dict(
    abstract_model: nnx.Module,
    source: Mapping[str, np.ndarray],
    *,
    source_name: str,
    rename: Callable[[str], str] | None = None,
    may_initialise: Callable[[str], bool] | None = None,
    init_fn: Callable[[], nnx.Module] | None = None,
    place: Callable[[Path, np.ndarray], jax.Array] | None = None,
):
    """Builds a concrete model from `abstract_model` (an `nnx.eval_shape` result) and `source`.

    Every parameter must come from `source` and every key of `source` must be used, except our
    parameters for which `may_initialise(our_dotted_path)` is true: those come from `init_fn()`
    and are reported. Arrays are cast to the model's parameter dtypes; `place` may put each one
    on its target sharding. Returns (model, LoadReport).
    """
    names = torch_names(abstract_model, rename)
    graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
    flat = dict(nnx.to_flat_state(params))

    missing, mismatched, to_init, used = [], [], [], set()
    values: dict[Path, Any] = {}
    for path, var in flat.items():
        src = names[path]
        target_shape = tuple(var.get_value().shape)
        if src.key not in source:
            if may_initialise is not None and may_initialise(path_str(path)):
                to_init.append(path)
            else:
                missing.append(src.key)
            continue
        used.add(src.key)
        array = np.asarray(source[src.key])
        want = expected_source_shape(target_shape, src.layout)
        if tuple(array.shape) != want:
            mismatched.append(f"{src.key}: {tuple(array.shape)} vs {want}")
            continue
        values[path] = to_ours(array, src.layout).astype(var.get_value().dtype)
    unexpected = sorted(set(source) - used)
    if missing or unexpected or mismatched:
        raise WeightLoadError(source_name, sorted(missing), unexpected, mismatched)

    fresh = {}
    if to_init:
        if init_fn is None:
            raise ValueError("parameters may be initialised but no init_fn was given")
        fresh = dict(
            nnx.to_flat_state(nnx.state(jax.jit(lambda: nnx.state(init_fn()))(), nnx.Param))
        )
    place = place or (lambda path, a: jnp.asarray(a))
    for path, var in flat.items():
        var.set_value(place(path, values[path]) if path in values else fresh[path].get_value())
    if any(True for _ in nnx.to_flat_state(rest)):
        raise ValueError("load_state_dict expects a model whose only variables are nnx.Param")
    model = nnx.merge(graphdef, nnx.from_flat_state(flat), rest)
    report = LoadReport(sorted(used), [path_str(p) for p in to_init])
    return model, report


def export_state_dict(
    model: nnx.Module, rename: Callable[[str], str] | None = None, dtype=None
) -> dict[str, np.ndarray]:
    """The model's parameters as a PyTorch-style {name: numpy array} dict (inverse of loading)."""
    names = torch_names(model, rename)
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        array = np.asarray(jax.device_get(var.get_value()))
        if dtype is not None:
            array = array.astype(dtype)
        out[names[path].key] = np.ascontiguousarray(to_torch(array, names[path].layout))
    return out


def count_params(model: nnx.Module) -> int:
    """Number of scalars in the model's nnx.Param leaves (works on abstract models)."""
    return sum(
        int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    )
