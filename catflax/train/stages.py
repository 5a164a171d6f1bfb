"""The four training stages of SPEC.md §5: what each trains, with which loss and learning rates."""

from __future__ import annotations

import dataclasses

from flax import nnx

STAGE_ORDER = ("1a", "1b", "2a", "2b")


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One row of SPEC.md §5's table."""

    name: str
    step: str  # "distill" or "denoise"
    trains: tuple[str, ...]  # top-level submodules of CATDiffusion that receive gradients
    tokens: str  # semantic tokens fed to the UNet: "none", "teacher" or "inpainter"


STAGES = {
    "1a": StageSpec("1a", "distill", ("inpainter",), "none"),
    "1b": StageSpec("1b", "denoise", ("unet",), "teacher"),
    "2a": StageSpec("2a", "denoise", ("inpainter",), "inpainter"),
    "2b": StageSpec("2b", "denoise", ("inpainter", "unet"), "inpainter"),
}

# Parameters on the fast learning rate: the inpainter and the UNet's reference adapter.
FAST_PARAM_MARKERS = ("inpainter", "ref_attn", "ref_norm")


def stage_spec(name: str) -> StageSpec:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages are {list(STAGES)}")
    return STAGES[name]


def trainable_filter(spec: StageSpec) -> nnx.filterlib.Filter:
    """nnx filter selecting the parameters a stage trains."""
    return nnx.All(nnx.Param, nnx.Any(*(nnx.PathContains(name) for name in spec.trains)))


def lr_group(path: tuple) -> str:
    """'fast' for inpainter and adapter parameters, 'slow' for the rest of the UNet."""
    return "fast" if any(str(p) in FAST_PARAM_MARKERS for p in path) else "slow"
