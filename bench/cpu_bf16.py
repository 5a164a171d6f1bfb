"""Where bf16 pays on this CPU: matmuls and 3x3 convolutions, XLA:CPU against PyTorch (oneDNN).

    python bench/cpu_bf16.py
    python bench/cpu_bf16.py --size=2048 --repeats=5

The CPU has AMX (bf16 tile matmuls). Rows: a size^3 matmul in fp32, bf16 with a bf16 result,
and bf16 operands with an fp32 result (`preferred_element_type=float32`, how catflax's attention
einsums accumulate); a 3x3 convolution at 64x64x128 (batch 4, NHWC) in fp32, bf16 and bf16 with
an fp32 result. JAX with catflax's XLA:CPU flags (`import catflax`), PyTorch eager with its
threads set to the machine's cores. GFLOP/s of the fastest of `--repeats` calls after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import torch

import catflax  # noqa: F401  (sets catflax's XLA:CPU flags before jax starts)
from bench import common

CONV = dict(batch=4, hw=64, channels=128)
# (row name, operand dtype, preferred_element_type) of the JAX rows
JAX_DTYPES = (("fp32", jnp.float32, None), ("bf16", jnp.bfloat16, None),
              ("bf16 -> fp32", jnp.bfloat16, jnp.float32))  # fmt: skip


def jax_rows(size: int, repeats: int) -> list[dict]:
    rows = []
    a32 = jax.random.normal(jax.random.key(0), (size, size))
    b32 = jax.random.normal(jax.random.key(1), (size, size))
    flops = 2 * size**3
    for name, dtype, result in JAX_DTYPES:
        a, b = a32.astype(dtype), b32.astype(dtype)
        f = jax.jit(lambda a, b, r=result: jnp.matmul(a, b, preferred_element_type=r))
        s = min(common.time_calls(lambda f=f, a=a, b=b: jax.block_until_ready(f(a, b)), repeats))
        rows.append(dict(op=f"matmul {size}^3", dtype=name, side="jax", gflops=flops / s / 1e9))
    n, hw, c = CONV["batch"], CONV["hw"], CONV["channels"]
    x32 = jax.random.normal(jax.random.key(2), (n, hw, hw, c))
    w32 = jax.random.normal(jax.random.key(3), (3, 3, c, c))
    flops = 2 * n * hw * hw * c * c * 9
    for name, dtype, result in JAX_DTYPES:
        x, w = x32.astype(dtype), w32.astype(dtype)
        f = jax.jit(
            lambda x, w, r=result: jax.lax.conv_general_dilated(
                x,
                w,
                (1, 1),
                "SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                preferred_element_type=r,
            )
        )
        s = min(common.time_calls(lambda f=f, x=x, w=w: jax.block_until_ready(f(x, w)), repeats))
        rows.append(dict(op=f"conv3x3 {hw}x{hw}x{c}", dtype=name, side="jax",
                         gflops=flops / s / 1e9))  # fmt: skip
    return rows


def torch_rows(size: int, repeats: int) -> list[dict]:
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    flops = 2 * size**3
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        s = min(common.time_calls(lambda a=a, b=b: a @ b, repeats))
        rows.append(dict(op=f"matmul {size}^3", dtype=name, side="torch", gflops=flops / s / 1e9))
    n, hw, c = CONV["batch"], CONV["hw"], CONV["channels"]
    flops = 2 * n * hw * hw * c * c * 9
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).to(dtype)
        x = torch.randn(n, c, hw, hw, dtype=dtype)
        with torch.no_grad():
            s = min(common.time_calls(lambda conv=conv, x=x: conv(x), repeats))
        rows.append(dict(op=f"conv3x3 {hw}x{hw}x{c}", dtype=name, side="torch",
                         gflops=flops / s / 1e9))  # fmt: skip
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="matmul side")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    load = os.getloadavg()
    rows = jax_rows(args.size, args.repeats) + torch_rows(args.size, args.repeats)
    record = dict(benchmark="cpu_bf16", **common.machine(), torch=torch.__version__,
                  torch_threads=torch.get_num_threads(), xla_flags=os.environ.get("XLA_FLAGS", ""),
                  size=args.size, conv=CONV, repeats=args.repeats,
                  load_avg=[load, os.getloadavg()], rows=rows)  # fmt: skip
    common.emit_json(record)
    common.print_table(rows, ["op", "dtype", "side", "gflops"],
                       title=f"GFLOP/s, fastest of {args.repeats}")  # fmt: skip
    return record


if __name__ == "__main__":
    main()
