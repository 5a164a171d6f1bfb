"""catflax's XLA:CPU flag defaults (catflax/xla_cpu.py)."""

import jax
import jax.numpy as jnp

from catflax import xla_cpu


def test_flag_appended_kept_or_opted_out(monkeypatch):
    monkeypatch.setattr(xla_cpu, "_backends_started", lambda: False)
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert xla_cpu.apply_cpu_flag_defaults(env)
    assert env["XLA_FLAGS"].split() == [
        "--xla_force_host_platform_device_count=2",
        "--xla_cpu_experimental_ynn_fusion_type=individual_dot",
    ]
    assert not xla_cpu.apply_cpu_flag_defaults(env)  # already there: not added twice

    own = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}  # the user's choice wins
    assert not xla_cpu.apply_cpu_flag_defaults(own)
    assert own["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type="

    opted_out = {"CATFLAX_XLA_CPU_DEFAULTS": "0"}
    assert not xla_cpu.apply_cpu_flag_defaults(opted_out)
    assert "XLA_FLAGS" not in opted_out

    empty: dict[str, str] = {}
    assert xla_cpu.apply_cpu_flag_defaults(empty)
    assert empty["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=individual_dot"


def test_nothing_changes_once_a_backend_runs():
    jax.devices()
    env = {"XLA_FLAGS": ""}
    assert not xla_cpu.apply_cpu_flag_defaults(env)
    assert env["XLA_FLAGS"] == ""


def test_convolutions_and_reductions_compile_to_xla_not_ynnpack():
    """conftest imports catflax before jax starts, as a user's program does: the flags are live."""
    x = jnp.ones((2, 64, 64, 32))  # small ones stay with XLA either way
    w = jnp.ones((3, 3, 32, 32))

    def conv_norm(x, w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip
        return y - y.mean(axis=(1, 2, 3), keepdims=True)

    for fn in (conv_norm, jax.grad(lambda x, w: conv_norm(x, w).sum(), argnums=(0, 1))):
        conv_hlo = jax.jit(fn).lower(x, w).compile().as_text()
        assert "convolution(" in conv_hlo and "__ynn" not in conv_hlo

    a = jnp.ones((64, 64))
    dot_hlo = jax.jit(lambda a: a @ a).lower(a).compile().as_text()
    assert "__ynn" in dot_hlo  # matrix products stay with YNNPACK
