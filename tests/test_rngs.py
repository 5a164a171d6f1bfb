"""catflax.models.rngs: the same keys as nnx.Rngs, without jax's trace-walking error messages."""

import jax
import numpy as np
from flax import nnx
from jax._src.interpreters import partial_eval

from catflax.models import rngs as rngs_lib
from catflax.models.cat import CATDiffusion
from catflax.models.inpainter import SemanticInpainter
from tests.tiny import TINY_CAT


def params(model) -> dict:
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model))}


def test_same_parameters_as_nnx_rngs_eagerly_and_jitted():
    want = params(CATDiffusion(TINY_CAT, rngs=nnx.Rngs(3)))
    eager = params(CATDiffusion(TINY_CAT, rngs=rngs_lib.rngs(3)))
    assert want.keys() == eager.keys() and len(want) > 100
    for path in want:
        np.testing.assert_array_equal(eager[path], want[path], err_msg=str(path))
    # Under jit, as the trainer builds its models: one part (the whole model's init program
    # took 22 s to compile).
    build = lambda rngs: SemanticInpainter(TINY_CAT.inpainter, rngs=rngs)  # noqa: E731
    want = params(build(nnx.Rngs(3)))
    jitted = jax.jit(lambda: nnx.state(build(rngs_lib.rngs(3))))()
    jitted = {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(jitted)}
    assert want.keys() == jitted.keys() and len(want) > 20
    for path in want:
        np.testing.assert_allclose(jitted[path], want[path], rtol=1e-6, atol=1e-6)
    stream = rngs_lib.rngs(3).params
    assert type(stream.fork()) is type(stream)  # forks keep the cheap stream


def test_abstract_module_builds_without_walking_the_trace(monkeypatch):
    """nnx.Rngs's indexed count update asks a tracer for its sharding, and jax builds the
    AttributeError's message by walking the trace so far (quadratic over a whole model);
    abstract_module's streams never do. Same shapes and dtypes as nnx.eval_shape's."""
    walks = []
    original = partial_eval.DynamicJaxprTracer._origin_msg
    monkeypatch.setattr(
        partial_eval.DynamicJaxprTracer,
        "_origin_msg",
        lambda self: walks.append(1) or original(self),
    )
    plain = nnx.eval_shape(lambda: CATDiffusion(TINY_CAT, rngs=nnx.Rngs(0)))
    assert walks, "nnx.Rngs no longer walks the trace: catflax.models.rngs can go"
    walks.clear()
    ours = rngs_lib.abstract_module(lambda rngs: CATDiffusion(TINY_CAT, rngs=rngs))
    assert not walks
    shapes = lambda m: {p: (v.shape, v.dtype) for p, v in nnx.to_flat_state(nnx.state(m))}  # noqa: E731
    assert shapes(ours) == shapes(plain)
    assert isinstance(
        nnx.state(ours, nnx.Param).flat_state()[0][1].get_value(), jax.ShapeDtypeStruct
    )
