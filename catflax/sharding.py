"""The device mesh, logical axis names for every parameter, and the rules that map them to the mesh.

Parameters get logical names from the type of the module that owns them (a Linear kernel is
("linear_in", "linear_out"), a Conv kernel (None, None, "conv_in", "conv_out"), ...); one rules
table, from config, maps logical names to mesh axes. A dimension whose size the mesh axis does not
divide stays replicated, so every model shards on every mesh.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both

# Default rules: every matrix is split along its output side over fsdp and tensor together.
# A value may be one mesh axis or a tuple of them (in a config: "fsdp,tensor"; "" replicates).
# Splitting a kernel in two dimensions at once ({in: fsdp, out: tensor}) gave wrong gradients on
# XLA:CPU with jax 0.10.2 (loss right, grads off; see tests/test_train_steps.py), so the defaults
# stay one-dimensional until that is verified on accelerators.
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "linear_in": None,
    "linear_out": ("fsdp", "tensor"),
    "conv_in": None,
    "conv_out": ("fsdp", "tensor"),
    "vocab": ("fsdp", "tensor"),
    "embed": None,
    "norm": None,
    "bias": None,
}


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Mesh axis sizes in MESH_AXES order; one size may be -1 to take the remaining devices."""
    shape = [int(sizes.get(name, 1)) for name in MESH_AXES]
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, shape))}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"{num_devices} devices do not split into mesh {dict(sizes)}")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
            f"there are {num_devices}"
        )
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with axes data, fsdp, tensor."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(sizes, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)  # GSPMD propagation, not explicit
    if devices == jax.devices():
        mesh = jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    else:
        mesh = Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)
    check_batch_split(mesh)
    return mesh


def check_batch_split(mesh: Mesh) -> None:
    """Every process reads its own examples (`process_index::process_count`), so the batch
    shards (positions along data x fsdp) of different processes must not overlap: a `tensor`
    axis that spans processes would have two processes feed one shard different data."""
    tensor_axis = MESH_AXES.index("tensor")
    devices = np.moveaxis(np.asarray(mesh.devices), tensor_axis, -1)
    owners = [{d.process_index for d in shard} for shard in devices.reshape(-1, devices.shape[-1])]
    shared = [sorted(o) for o in owners if len(o) > 1]
    if shared:
        raise ValueError(
            f"mesh {dict(mesh.shape)}: batch shards are split over processes {shared[0]} (the "
            "tensor axis spans processes); keep `tensor` within one process's devices (a host's, "
            "with one process per host)"
        )


def logical_axes(model: nnx.Module) -> dict[tuple, tuple[str | None, ...]]:
    """Logical axis names of every nnx.Param of `model` (abstract or concrete), by owner type."""
    owners = {path: type(m) for path, m in nnx.iter_modules(model)}
    names = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        owner, leaf = owners.get(path[:-1], nnx.Module), path[-1]
        ndim = len(var.get_value().shape)
        if leaf == "kernel" and issubclass(owner, nnx.Linear):
            axes = ("linear_in", "linear_out")
        elif leaf == "kernel" and issubclass(owner, nnx.Conv):
            axes = (None,) * (ndim - 2) + ("conv_in", "conv_out")
        elif leaf == "embedding" and issubclass(owner, nnx.Embed):
            axes = ("vocab", "embed")
        elif leaf == "bias":
            axes = ("bias",) * ndim
        elif leaf == "scale":
            axes = ("norm",) * ndim
        else:  # free-standing tables (positions, class token, ...): shard the last dim like embed
            axes = (None,) * (ndim - 1) + ("embed",) if ndim else ()
        names[path] = axes
    return names


Rule = str | Sequence[str] | None


def normalize_rules(rules: Mapping[str, Rule] | None) -> dict[str, tuple[str, ...]]:
    """DEFAULT_RULES updated by `rules`, each as a tuple of mesh axes. A rule is a mesh axis, a
    tuple of them, a comma-separated string ("fsdp,tensor": how the config spells it, since
    ml_collections cannot override a None or change a tuple's length), or None / "" (replicate).
    Unknown logical names or mesh axes are an error that names them."""
    out = {}
    for name, rule in {**DEFAULT_RULES, **(rules or {})}.items():
        if name not in DEFAULT_RULES:
            known = list(DEFAULT_RULES)
            raise ValueError(f"sharding rule {name!r}: no such logical axis (known: {known})")
        parts = rule.split(",") if isinstance(rule, str) else rule or ()
        axes = tuple(a.strip() for a in parts if a and a.strip())
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ValueError(f"sharding rule {name}={rule!r}: {bad} not mesh axes {MESH_AXES}")
        out[name] = axes
    return out


def partition_spec(
    shape: Sequence[int],
    axes: Sequence[str | None],
    rules: Mapping[str, tuple[str, ...]],
    mesh: Mesh,
) -> PartitionSpec:
    """The PartitionSpec for one array under `normalize_rules` output; a mesh axis is used once
    and only where it divides."""
    used, spec = set(), []
    for size, name in zip(shape, axes):
        mesh_axes = rules.get(name) if name else None
        # Keep the axes (in order) that are unused and still divide the dimension.
        kept, split = [], 1
        for axis in mesh_axes or ():
            if axis not in used and size % (split * mesh.shape[axis]) == 0:
                kept.append(axis)
                split *= mesh.shape[axis]
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def param_shardings(
    model: nnx.Module, mesh: Mesh, rules: Mapping[str, Rule] | None = None
) -> dict[tuple, NamedSharding]:
    """NamedSharding of every parameter path of `model` (use an `nnx.eval_shape` model) under
    DEFAULT_RULES updated by `rules` (see normalize_rules)."""
    rules = normalize_rules(rules)
    axes = logical_axes(model)
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        spec = partition_spec(var.get_value().shape, axes[path], rules, mesh)
        out[path] = NamedSharding(mesh, spec)
    return out


def unsplit_report(
    model: nnx.Module,
    shardings: Mapping[tuple, NamedSharding],
    rules: Mapping[str, Rule] | None,
    min_bytes: int = 2**26,
) -> str | None:
    """A warning naming the parameters whose rules ask for mesh axes they could not be split
    over (a dimension the axis size does not divide: SD's 320-multiple widths and fsdp > 64),
    with the bytes each device then holds beyond an even split; None where that excess is under
    `min_bytes` or 5% of an even share."""
    rules, axes = normalize_rules(rules), logical_axes(model)
    examples, extra, total = [], 0, 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        nbytes = int(np.prod(value.shape)) * np.dtype(value.dtype).itemsize
        sharding = shardings[path]
        wanted = {a for name in axes[path] if name for a in rules.get(name, ())}
        used = {a for entry in sharding.spec if entry for a in (entry if isinstance(entry, tuple)
                                                                 else (entry,))}  # fmt: skip
        missing = [a for a in sorted(wanted - used) if sharding.mesh.shape[a] > 1]
        total += nbytes
        if missing:
            split = int(np.prod([sharding.mesh.shape[a] for a in used])) if used else 1
            want = split * int(np.prod([sharding.mesh.shape[a] for a in missing]))
            extra += nbytes // split - nbytes // want
            name = "/".join(map(str, path))
            examples.append((nbytes, f"{name} {tuple(value.shape)} not over {missing}"))
    if not shardings:
        return None
    mesh = next(iter(shardings.values())).mesh
    split = math.prod(mesh.shape[a] for a in {a for r in rules.values() for a in r})
    if extra <= max(0.05 * total / split, min_bytes):
        return None
    return (
        f"{len(examples)} parameters could not be split over every mesh axis their rules name "
        f"(the axis size does not divide the dimension): {extra / 2**30:.3g} GiB more per device "
        f"than an even split of the model's {total / 2**30:.3g} GiB, before the AdamW moments and "
        f"EMA that follow them (largest: {max(examples)[1]}); "
        "a smaller fsdp axis (and a larger data axis) splits them evenly"
    )


def state_shardings(state: nnx.State, shardings: Mapping[tuple, NamedSharding]) -> nnx.State:
    """An nnx.State of NamedShardings matching `state` (a subset of the model's parameters)."""
    flat = [(path, shardings[path]) for path, _ in nnx.to_flat_state(state)]
    return nnx.from_flat_state(flat)


def batch_shards(mesh) -> int:
    """How many ways a batch is split: the product of the mesh's BATCH_AXES sizes."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) axis split over data and fsdp; the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local numpy arrays -> global jax arrays sharded over the batch axes."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
        for k, v in local_batch.items()
    }
