"""XLA:CPU settings catflax applies before JAX starts its backends (imported by `catflax`).

jaxlib 0.10 hands CPU convolutions and reductions to YNNPACK by default. On the x86 CPU we
measured (docs/PERFORMANCE.md, bench/cpu_ops.py), YNNPACK's convolutions ran 2x slower than XLA's
Eigen ones in the forward pass and 3-10x slower for weight gradients, and its reductions made
GroupNorm 2.5x slower; its matrix products are as fast as Eigen's. (Softmax's row reductions were
faster in YNNPACK; catflax's attention now takes its row max with elementwise maximums instead,
catflax/models/attention.py.) So catflax keeps YNNPACK for dots only:

    XLA_FLAGS+=" --xla_cpu_experimental_ynn_fusion_type=individual_dot"

The flag only concerns the CPU backend (GPU and TPU programs are unchanged). It is appended to
`XLA_FLAGS` when `catflax` is imported, unless
  - `XLA_FLAGS` already sets `--xla_cpu_experimental_ynn_fusion_type` (the user's choice wins),
  - `CATFLAX_XLA_CPU_DEFAULTS=0` is set in the environment (opt out),
  - jaxlib is older than 0.10 (which may not know the flag: XLA stops on unknown flags), or
  - a JAX backend is already running (XLA has read its flags; nothing can change them then).
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from importlib import metadata

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
CPU_FLAGS = (f"{YNN_FUSION_FLAG}=individual_dot",)
OPT_OUT_VARIABLE = "CATFLAX_XLA_CPU_DEFAULTS"
MIN_JAXLIB = (0, 10)


def _jaxlib_version() -> tuple[int, ...] | None:
    try:
        return tuple(int(p) for p in metadata.version("jaxlib").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return None


def _backends_started() -> bool:
    bridge = sys.modules.get("jax._src.xla_bridge")
    if bridge is None:
        return False
    started = getattr(bridge, "backends_are_initialized", None)
    return bool(started and started())


def apply_cpu_flag_defaults(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Appends CPU_FLAGS to environ["XLA_FLAGS"] (see the module docstring); True if it did."""
    if environ.get(OPT_OUT_VARIABLE, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    flags = environ.get("XLA_FLAGS", "")
    if YNN_FUSION_FLAG in flags:
        return False
    jaxlib_version = _jaxlib_version()
    if jaxlib_version is None or jaxlib_version < MIN_JAXLIB or _backends_started():
        return False
    environ["XLA_FLAGS"] = " ".join([flags.strip(), *CPU_FLAGS]).strip()
    return True
