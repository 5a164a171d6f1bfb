"""catflax: CAT-Diffusion in JAX/Flax NNX. `from catflax import CATPipeline` imports jax lazily."""

from catflax import xla_cpu

xla_cpu.apply_cpu_flag_defaults()  # before any backend starts; see catflax/xla_cpu.py

__all__ = ["CATPipeline"]


def __getattr__(name: str):
    if name == "CATPipeline":
        from catflax.pipeline import CATPipeline

        return CATPipeline
    raise AttributeError(f"module 'catflax' has no attribute {name!r}")
