"""Orbax checkpoints of the train state, the data iterator position and the config."""

from __future__ import annotations

import json
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Async, keep-N, atomic saves of {state, data iterator, config} under one directory."""

    def __init__(self, directory: str, keep: int = 2, async_save: bool = True):
        self.manager = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator=None, config=None) -> None:
        import grain

        args = {"state": ocp.args.StandardSave(_storable(state))}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            args["config"] = ocp.args.JsonSave(json.loads(config.to_json_best_effort()))
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(self, abstract_state: Any, data_iterator=None, step: int | None = None):
        """Restores into the structure and shardings of `abstract_state` (arrays or
        `abstract_state(...)`); returns (step, state)."""
        import grain

        step = self.latest_step() if step is None else step
        if step is None:
            return None, None
        target = jax.tree.map(_abstract, _storable(abstract_state))
        args = {"state": ocp.args.StandardRestore(target)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return step, _unstorable(restored["state"], abstract_state)

    def saved_config(self, step: int) -> dict | None:
        """The config saved with checkpoint `step` (as JSON), or None if it has none."""
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
            )
        except (KeyError, ValueError, FileNotFoundError):
            return None
        return restored["config"]

    def data_files(self, step: int) -> list[str]:
        """The names of checkpoint `step`'s data-position files (one per process)."""
        from etils import epath

        folder = epath.Path(self.manager.directory) / str(step) / "data"
        return sorted(p.name for p in folder.iterdir()) if folder.exists() else []

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_state(state: Any) -> Any:
    """The shapes, dtypes and shardings of `state`: what `restore` needs. Restoring into this
    (and dropping the state first) keeps one train state on the devices, not two."""
    return jax.tree.map(_abstract, state)


def _is_key(x) -> bool:
    return isinstance(x, jax.Array | jax.ShapeDtypeStruct) and jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key
    )


def _key_data(x):
    if not _is_key(x):
        return x
    if isinstance(x, jax.ShapeDtypeStruct):
        data = jax.eval_shape(jax.random.key_data, x)
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)
    return jax.random.key_data(x)


def _storable(tree):
    """Typed PRNG keys are stored as their raw key data."""
    return jax.tree.map(_key_data, tree)


def _unstorable(tree, like):
    return jax.tree.map(
        lambda x, ref: jax.random.wrap_key_data(x) if _is_key(ref) else x, tree, like
    )


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return ocp.utils.to_shape_dtype_struct(x)
