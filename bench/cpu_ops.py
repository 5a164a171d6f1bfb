"""Single operations of the UNet and VAE on CPU: jitted JAX (XLA:CPU) against eager PyTorch.

    python bench/cpu_ops.py                       # catflax's XLA:CPU flags and jaxlib's defaults
    python bench/cpu_ops.py --modes=catflax --batch=4 --repeats=7

Each op runs forward alone and forward + backward (gradients of every input and parameter; the
PyTorch conv also has a bias), fp32, at shapes of bench/vs_pytorch.py's stage-2b step (batch 4,
256 px images, 32x32 latents). The JAX side runs once per `--modes` entry, each in its own
process because XLA reads its flags once:
  catflax          as `import catflax` sets them (catflax/xla_cpu.py: YNNPACK for dots only)
  jaxlib_default   jaxlib's own defaults (CATFLAX_XLA_CPU_DEFAULTS=0)
Attention is catflax's "xla" and "chunked" (catflax.models.attention) against PyTorch's
scaled_dot_product_attention. Times are the fastest of `--repeats` calls after a warm-up, in
milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = {"catflax": "1", "jaxlib_default": "0"}  # -> CATFLAX_XLA_CPU_DEFAULTS


def op_shapes() -> dict[str, dict]:
    """name -> sizes (NHWC / tokens): the VAE's first levels and some of the UNet's."""
    return {
        "conv3x3 256x256x32": dict(kind="conv", hw=256, cin=32, cout=32),
        "conv3x3 128x128x64": dict(kind="conv", hw=128, cin=64, cout=64),
        "conv3x3 32x32x64": dict(kind="conv", hw=32, cin=64, cout=64),
        "conv3x3 8x8x256": dict(kind="conv", hw=8, cin=256, cout=256),
        "groupnorm16+silu 256x256x32": dict(kind="groupnorm", hw=256, cin=32, groups=16),
        "groupnorm32+silu 32x32x64": dict(kind="groupnorm", hw=32, cin=64, groups=32),
        "attention 1024 tokens, 2 heads x 32": dict(
            kind="attention", tokens=1024, heads=2, dim=32, implementation="xla"
        ),
        "the same, chunked": dict(
            kind="attention", tokens=1024, heads=2, dim=32, implementation="chunked"
        ),
    }


def best_ms(fn, repeats: int) -> float:
    """Milliseconds of the fastest of `repeats` calls after one warm-up (bench/common.py)."""
    from bench import common

    return 1e3 * min(common.time_calls(fn, repeats))


def time_jax(batch: int, repeats: int) -> dict[str, dict[str, float]]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from catflax.models import attention as attention_lib
    from catflax.models import layers  # importing catflax applies its XLA:CPU flag defaults

    rng = jax.random.key(0)
    out = {}
    for name, s in op_shapes().items():
        if s["kind"] == "conv":
            args = (jax.random.normal(rng, (batch, s["hw"], s["hw"], s["cin"])),
                    0.05 * jax.random.normal(rng, (3, 3, s["cin"], s["cout"])))  # fmt: skip

            def f(x, w):
                return jax.lax.conv_general_dilated(
                    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
                )
        elif s["kind"] == "groupnorm":
            norm = layers.group_norm(s["cin"], s["groups"], 1e-5, rngs=nnx.Rngs(0),
                                     dtype=jnp.float32, param_dtype=jnp.float32)  # fmt: skip
            graphdef, params = nnx.split(norm)
            args = (jax.random.normal(rng, (batch, s["hw"], s["hw"], s["cin"])), params)

            def f(x, p, graphdef=graphdef):
                return jax.nn.silu(nnx.merge(graphdef, p)(x))
        else:
            q = jax.random.normal(rng, (batch, s["tokens"], s["heads"], s["dim"]))
            args = (q, q + 1, q - 1)

            def f(q, k, v, implementation=s["implementation"]):
                return attention_lib.dot_product_attention(q, k, v, implementation=implementation)

        fwd = jax.jit(f)
        every_input = tuple(range(len(args)))  # as PyTorch's backward: all of them
        grad = jax.jit(jax.grad(lambda *a, f=f: f(*a).sum(), argnums=every_input))
        out[name] = dict(
            forward=best_ms(lambda fwd=fwd, args=args: fwd(*args), repeats),
            forward_backward=best_ms(lambda grad=grad, args=args: grad(*args), repeats),
        )
    return out


def time_torch(batch: int, repeats: int) -> dict[str, dict[str, float]]:
    import torch

    out = {}
    for name, s in op_shapes().items():
        if s["kind"] == "conv":
            module = torch.nn.Conv2d(s["cin"], s["cout"], 3, padding=1)
            x = torch.randn(batch, s["cin"], s["hw"], s["hw"])
            inputs, f = [x], module
        elif s["kind"] == "groupnorm":
            module = torch.nn.GroupNorm(s["groups"], s["cin"])
            x = torch.randn(batch, s["cin"], s["hw"], s["hw"])
            inputs, f = [x], lambda x, m=module: torch.nn.functional.silu(m(x))
        else:
            q = torch.randn(batch, s["heads"], s["tokens"], s["dim"])
            inputs = [q, q + 1, q - 1]
            f = torch.nn.functional.scaled_dot_product_attention

        def forward(f=f, inputs=inputs):
            with torch.no_grad():
                f(*inputs)

        def forward_backward(f=f, inputs=inputs):
            leaves = [i.detach().requires_grad_() for i in inputs]
            f(*leaves).sum().backward()

        out[name] = dict(forward=best_ms(forward, repeats),
                         forward_backward=best_ms(forward_backward, repeats))  # fmt: skip
    return out


def run(modes, batch: int, repeats: int) -> dict:
    from bench import common
    from catflax import xla_cpu

    load = os.getloadavg()
    jax_times = {}
    xla_flags, jax_flags = os.environ.get("XLA_FLAGS", "").split(), {}
    for mode in modes:  # each child starts from XLA_FLAGS without catflax's own additions
        flags = " ".join(f for f in xla_flags if f not in xla_cpu.CPU_FLAGS)
        env = dict(os.environ, CATFLAX_XLA_CPU_DEFAULTS=MODES[mode], XLA_FLAGS=flags)
        child = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--_jax_only", f"--batch={batch}",
             f"--repeats={repeats}"],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        jax_flags[mode], jax_times[mode] = json.loads(child.stdout.strip().splitlines()[-1])
    torch_times = time_torch(batch, repeats)
    import torch

    record = dict(benchmark="cpu_ops", **common.machine(), torch=torch.__version__,
                  torch_threads=torch.get_num_threads(), batch=batch, repeats=repeats,
                  load_avg=[load, os.getloadavg()], xla_flags=jax_flags, jax_ms=jax_times,
                  torch_ms=torch_times)  # fmt: skip
    common.emit_json(record)
    rows = []
    for name, t in torch_times.items():
        for part in ("forward", "forward_backward"):
            row = {"op": name, "pass": part, "torch_ms": t[part]}
            for mode in modes:
                row[f"jax_{mode}_ms"] = jax_times[mode][name][part]
                row[f"ratio_{mode}"] = jax_times[mode][name][part] / t[part]
            rows.append(row)
    common.print_table(rows, list(rows[0]),
                       title=f"CPU ops, batch {batch}, fp32; ms, fastest of {repeats}; "
                       "ratio = jax / torch")  # fmt: skip
    return record


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="catflax,jaxlib_default",
                        help=f"comma-separated, of {sorted(MODES)}")  # fmt: skip
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--_jax_only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._jax_only:  # the child process: JAX timings as one JSON line
        times = time_jax(args.batch, args.repeats)
        print(json.dumps([os.environ.get("XLA_FLAGS", ""), times]))
        return None
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown --modes {unknown}; known: {sorted(MODES)}")
    return run(modes, args.batch, args.repeats)


if __name__ == "__main__":
    main()
