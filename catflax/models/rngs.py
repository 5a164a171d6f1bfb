"""Random streams for building models: flax's nnx.Rngs, made cheap to use while jax traces.

flax 0.12's `RngStream.__call__` advances its count with an indexed update (`count[...] += 1`),
which asks the new count for its `.sharding`; under a trace that is a tracer, and jax answers
with an AttributeError whose message walks the whole trace so far. Building a model inside
`nnx.eval_shape` or `jax.jit` (thousands of draws) was therefore quadratic: 34 s of Python for
the abstract full-size CAT-Diffusion (configs/coco.py), 1.3 s with the streams here, which draw
the same keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax
from flax import nnx

ModuleT = TypeVar("ModuleT", bound=nnx.Module)


class _Stream(nnx.RngStream):
    """An nnx.RngStream whose count is replaced whole rather than through an index."""

    def __call__(self) -> jax.Array:
        self.count._check_can_update()
        count = self.count.get_value()
        key = jax.random.fold_in(self.key.get_value(), count)
        self.count.set_value(count + 1)
        return key


def rngs(seed: int | jax.Array = 0) -> nnx.Rngs:
    """nnx.Rngs(seed): the same keys in the same order, cheap under tracing."""
    out = nnx.Rngs(seed)
    for tag, stream in list(vars(out).items()):
        if isinstance(stream, nnx.RngStream):
            setattr(out, tag, _Stream(key=stream.key.get_value(), tag=tag))
    return out


def abstract_module(build: Callable[[nnx.Rngs], ModuleT], seed: int = 0) -> ModuleT:
    """`build(rngs)` under nnx.eval_shape: the module's structure and shapes, no weights made."""
    return nnx.eval_shape(lambda: build(rngs(seed)))
