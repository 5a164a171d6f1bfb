"""catflax: CAT-Diffusion in JAX/Flax NNX. `from catflax import CATPipeline` imports jax lazily."""

__all__ = ["CATPipeline"]


def __getattr__(name: str):
    if name == "CATPipeline":
        from catflax.pipeline import CATPipeline

        return CATPipeline
    raise AttributeError(f"module 'catflax' has no attribute {name!r}")
