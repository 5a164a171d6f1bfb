"""Our stage-2b training step next to the PyTorch reference's, same sizes, batch and weights, CPU.

    python bench/vs_pytorch.py                                   # fp32 against fp32
    python bench/vs_pytorch.py --variants=fp32,bf16_towers,bf16,remat --steps=4

PyTorch (bench/torch_reference.py): transformers CLIP text twice (context, then pooled label),
CLIP vision on the masked image, the diffusers VAE encoder on image and masked image, the
SPEC.md §3 inpainter, diffusers' UNet with the SPEC.md §2 adapter, MSE, backward, AdamW; eager,
fp32. Ours: `catflax.train.steps.jit_step` (CLIP text once, everything in one XLA program).
The PyTorch models are built with their libraries' default init and saved; ours load them with
our loaders (adapter: ours exported into PyTorch), so both start from the same weights. Steps
alternate between the two (so load from other processes hits both alike); the headline
ratios are of the fastest step of each side (the least disturbed), medians are in the JSON.
Variants change our compute dtype / remat only (parameters stay fp32):
  fp32          everything fp32 (as the reference)
  bf16_towers   frozen CLIP text, CLIP vision and VAE compute in bf16
  bf16          every part computes in bf16
  remat         UNet and inpainter blocks recomputed in the backward pass
  chunked       attention="chunked" in the UNet, VAE and inpainter: queries in blocks of 256,
                FlashAttention's backward (catflax.models.attention)
Combine with "+", e.g. chunked+bf16_towers. The "xla" attention every variant uses otherwise is
already catflax's heads-major layout, not jax.nn.dot_product_attention's.
Conditioning dropout is off on both sides by default (`--cond_dropout=0.1` is the reference's).
The reference's LDM UNet also recomputes every block in its backward (`use_checkpoint: True`);
the PyTorch side here does not, so it is faster than the reference itself: our `remat` variant
is the like-for-like comparison with the reference, plain ours with this PyTorch side.
The UNet has 2 heads, so that its head sizes (32, 64, 128) are near SD-1.5's (40, 80, 160) at
1/5 of its width; `--unet_heads=8` keeps SD's head count instead (head sizes 8, 16, 32).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from bench import common
from bench import torch_reference as ref
from catflax import sharding as sharding_lib
from catflax.models.cat import CATConfig, CATDiffusion
from catflax.models.clip import CLIPTextModel, CLIPVisionModel
from catflax.models.inpainter import SemanticInpainter
from catflax.models.rngs import abstract_module
from catflax.models.unet import UNet
from catflax.models.vae import AutoencoderKL
from catflax.train.steps import compiled_flops, create_state, jit_step
from catflax.weights import convert
from configs import cpu_bench

BENCH_CAT = cpu_bench.MODEL  # configs/cpu_bench.py: ours alone with bench/train_step.py
PARTS = ("clip_text", "clip_vision", "vae", "unet", "inpainter")
TOWERS = ("clip_text", "clip_vision", "vae")


def variant_config(cfg: CATConfig, variant: str) -> CATConfig:
    """`cfg` with a variant's compute dtypes / remat (see the module docstring)."""
    changes: dict[str, dict] = {p: {} for p in PARTS}
    for piece in variant.split("+"):
        if piece == "fp32":
            continue
        elif piece == "chunked":
            for p in ("unet", "vae", "inpainter"):
                changes[p]["attention"] = "chunked"
        elif piece == "bf16_towers":
            for p in TOWERS:
                changes[p]["dtype"] = "bfloat16"
        elif piece == "bf16":
            for p in PARTS:
                changes[p]["dtype"] = "bfloat16"
        elif piece == "remat":
            changes["unet"]["remat"] = changes["inpainter"]["remat"] = True
        else:
            raise ValueError(
                f"unknown variant {piece!r}; known: fp32, bf16_towers, bf16, remat, chunked"
            )
    return dataclasses.replace(
        cfg, **{p: dataclasses.replace(getattr(cfg, p), **c) for p, c in changes.items() if c}
    )


# ============================================================================ same weights
def shared_weights(cfg: CATConfig, workdir: str, seed: int = 0, prepare=None):
    """PyTorch models (default init, then `prepare(models)` if given) and ours loaded from them:
    (TorchModels, CATConfig, params)."""
    tm = ref.build(cfg, seed)
    if prepare is not None:
        prepare(tm)
    for name, module in (("clip_text", tm.text), ("clip_vision", tm.vision), ("vae", tm.vae),
                         ("unet", tm.unet)):  # fmt: skip
        module.save_pretrained(os.path.join(workdir, name))
    text = CLIPTextModel.from_pretrained(os.path.join(workdir, "clip_text"))
    vision = CLIPVisionModel.from_pretrained(os.path.join(workdir, "clip_vision"))
    vae = AutoencoderKL.from_pretrained(os.path.join(workdir, "vae"))
    unet = UNet.from_pretrained(workdir, init_missing_adapter=True, ref_dim=cfg.unet.ref_dim,
                                seed=seed)  # fmt: skip
    inpainter = SemanticInpainter.from_state_dict(
        {k: v.numpy() for k, v in tm.inpainter.state_dict().items()}, cfg.inpainter, prefix=""
    )
    ref.add_reference_adapter(tm.unet, cfg.unet.ref_dim)
    ref.load_numpy_state(tm.unet, convert.export_state_dict(unet))  # the adapter: ours -> torch
    parts = dict(clip_text=text, clip_vision=vision, vae=vae, unet=unet, inpainter=inpainter)
    loaded_cfg = CATConfig(**{p: m.config for p, m in parts.items()})
    _, params = nnx.split(
        abstract_module(lambda rngs: CATDiffusion(loaded_cfg, rngs=rngs)), nnx.Param
    )
    for p, m in parts.items():
        params[p] = nnx.state(m, nnx.Param)
    return tm, loaded_cfg, params


def graphdef_for(cfg: CATConfig) -> nnx.GraphDef:
    return nnx.split(abstract_module(lambda rngs: CATDiffusion(cfg, rngs=rngs)), nnx.Param)[0]


def bench_config(cfg: CATConfig):
    """A run config (configs/cpu_bench.py) for `common.stage_setup`: AdamW without clipping, as
    the PyTorch step."""
    config = cpu_bench.get_config()
    config.optimizer.grad_clip_norm = 0.0
    return config


# ============================================================================ the UNet alone
def unet_inputs(cfg: CATConfig, batch: int, latent: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    u = cfg.unet
    return dict(
        x=rng.standard_normal((batch, latent, latent, u.in_channels)).astype(np.float32),
        t=rng.integers(0, 1000, batch).astype(np.int64),
        context=rng.standard_normal((batch, 77, u.cross_attention_dim)).astype(np.float32),
        tokens=rng.standard_normal((batch, 64, u.ref_dim)).astype(np.float32),
        noise=rng.standard_normal((batch, latent, latent, u.out_channels)).astype(np.float32),
    )


def unet_torch_args(inp):
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    return (nchw(inp["x"]), torch.from_numpy(inp["t"]), torch.from_numpy(inp["context"]),
            torch.from_numpy(inp["tokens"]), nchw(inp["noise"]))  # fmt: skip


def ours_unet_fwd_bwd(unet_graphdef, unet_params, inp):
    """A compiled call: ((loss, eps), grads) of the UNet alone on `inp`."""

    @jax.jit
    def fwd_bwd(params, x, t, context, tokens, noise):
        def loss(p):
            eps = nnx.merge(unet_graphdef, p)(x, t, context, tokens).astype(jnp.float32)
            return jnp.mean((eps - noise) ** 2), eps

        return jax.value_and_grad(loss, has_aux=True)(params)

    args = [jnp.asarray(inp[k]) for k in ("x", "t", "context", "tokens", "noise")]
    args[1] = args[1].astype(jnp.int32)
    compiled = fwd_bwd.lower(unet_params, *args).compile()
    return lambda: compiled(unet_params, *args)


# ============================================================================ the benchmark
def compile_ours(cfg, variant, params, config, shardings, mesh, batch, u_inp, seed):
    """Our jitted step (state donated) and UNet forward+backward for one variant, compiled."""
    vcfg = variant_config(cfg, variant)
    model = nnx.merge(graphdef_for(vcfg), params)
    setup = common.stage_setup(config, "2b", model)
    state_sh = common.train_state_shardings(setup, shardings, mesh, ema=False)
    frozen_sh = common.tree_of_shardings(setup.frozen, shardings)
    batch_sh = jax.tree.map(lambda x: x.sharding, batch)
    state = jax.jit(lambda p: create_state(p, setup.tx, jax.random.key(seed), False),
                    out_shardings=state_sh)(setup.trainable)  # fmt: skip
    step_fn = jit_step(setup.graphdef, setup.tx, setup.step_cfg, state_sh, frozen_sh, batch_sh)
    start = time.perf_counter()
    compiled = step_fn.lower(state, setup.frozen, batch).compile()
    compile_s = time.perf_counter() - start
    unet_gd, unet_params = nnx.split(model.unet, nnx.Param)
    ours_unet = ours_unet_fwd_bwd(unet_gd, unet_params, u_inp)
    holder = {"state": state}

    def ours_step():
        holder["state"], metrics = compiled(holder["state"], setup.frozen, batch)
        return metrics["loss"]

    return ours_step, ours_unet, compile_s, compiled_flops(compiled)


def run(
    cfg: CATConfig, batch_size: int, resolution: int, steps: int, variants, seed: int = 0,
    cond_dropout: float = 0.0,
):  # fmt: skip
    """Times both steps (and the UNet alone) per variant; returns the record (also printed)."""
    torch.manual_seed(seed)
    load = os.getloadavg()  # other processes on the machine skew timings: recorded
    mesh = sharding_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    with tempfile.TemporaryDirectory() as workdir:
        tm, cfg, params = shared_weights(cfg, workdir, seed)
    config = bench_config(cfg)
    config.train.cond_dropout = cond_dropout  # 0: the same work on both sides every step
    host = common.random_batch(cfg, batch_size, resolution, seed=seed)
    batch = sharding_lib.global_batch(host, mesh)
    abstract = abstract_module(lambda rngs: CATDiffusion(cfg, rngs=rngs))
    shardings = sharding_lib.param_shardings(abstract, mesh)
    latent = resolution // common.latent_factor(cfg)
    u_inp = unet_inputs(cfg, batch_size, latent)
    u_torch = unet_torch_args(u_inp)

    # Same weights (before either side trains): each variant's UNet forward is compared to this.
    with torch.no_grad():
        eps_torch = tm.unet(u_torch[0], u_torch[1], u_torch[2],
                            cross_attention_kwargs={"ref_tokens": u_torch[3]}).sample  # fmt: skip
    eps_torch = eps_torch.numpy().transpose(0, 2, 3, 1)

    opt = ref.make_optimizer(tm, config.stage_2b.lr_fast, config.stage_2b.lr_slow,
                             config.optimizer.weight_decay)  # fmt: skip
    torch_step = ref.ReferenceStep(tm, opt, config.train.cond_dropout, seed)
    torch_batch = torch_step.to_torch(host)
    torch_step(torch_batch)  # warm-up (allocates AdamW state)
    ref.unet_forward_backward(tm.unet, *u_torch)

    results = {}
    for variant in variants:
        ours_step, ours_unet, compile_s, flops = compile_ours(
            cfg, variant, params, config, shardings, mesh, batch, u_inp, seed
        )
        (_, eps_ours), _ = jax.block_until_ready(ours_unet())  # warm-up, and same weights:
        parity = float(np.abs(np.asarray(eps_ours) - eps_torch).max())  # |ours - PyTorch|
        jax.block_until_ready(ours_step())
        times = {k: [] for k in ("ours_step", "torch_step", "ours_unet", "torch_unet")}
        for _ in range(steps):  # alternate, so background load hits both alike
            for name, fn in (("torch_step", lambda: torch_step(torch_batch)),
                             ("ours_step", ours_step),
                             ("torch_unet", lambda: ref.unet_forward_backward(tm.unet, *u_torch)),
                             ("ours_unet", ours_unet)):  # fmt: skip
                start = time.perf_counter()
                jax.block_until_ready(fn())
                times[name].append(time.perf_counter() - start)
        best = {k: min(v) for k, v in times.items()}
        med = {k: common.summary(v)["median_s"] for k, v in times.items()}
        results[variant] = dict(
            compile_s=compile_s, gflop=flops / 1e9, unet_max_abs_diff=parity,
            **{f"{k}_s": v for k, v in best.items()},
            step_ratio=best["ours_step"] / best["torch_step"],
            unet_ratio=best["ours_unet"] / best["torch_unet"],
            median_step_ratio=med["ours_step"] / med["torch_step"],
            median_unet_ratio=med["ours_unet"] / med["torch_unet"],
            times_s=times,
        )  # fmt: skip
        del ours_step, ours_unet

    parts: dict[str, float] = {}  # the fastest of 3 steps, part by part
    for _ in range(3):
        one: dict[str, float] = {}
        torch_step(torch_batch, one)
        parts = {k: min(v, parts.get(k, v)) for k, v in one.items()}
    record = dict(
        benchmark="vs_pytorch", **common.machine(), torch=torch.__version__,
        torch_threads=torch.get_num_threads(), xla_flags=os.environ.get("XLA_FLAGS", ""),
        batch_size=batch_size, resolution=resolution, steps=steps, cond_dropout=cond_dropout,
        load_avg=[load, os.getloadavg()],
        params=dict(unet=ref.param_count(tm.unet), inpainter=ref.param_count(tm.inpainter),
                    clip_text=ref.param_count(tm.text), clip_vision=ref.param_count(tm.vision),
                    vae=ref.param_count(tm.vae)),
        torch_breakdown_s=parts,
        model={p: dataclasses.asdict(getattr(cfg, p)) for p in PARTS}, variants=results,
    )  # fmt: skip
    common.emit_json(record)
    common.print_table(
        [dict(variant=v, **r) for v, r in results.items()],
        ["variant", "compile_s", "ours_step_s", "torch_step_s", "step_ratio", "ours_unet_s",
         "torch_unet_s", "unet_ratio"],
        title=f"stage-2b step, batch {batch_size} at {resolution} px, CPU "
        f"({torch.get_num_threads()} torch threads); seconds: fastest of {steps}; "
        "ratio = ours / PyTorch",
    )  # fmt: skip
    print(
        "PyTorch step by part (s, fastest of 3): "
        + ", ".join(f"{k} {v:.3f}" for k, v in parts.items())
    )
    print("UNet forward from the same weights, max |ours - PyTorch|: " + ", ".join(
        f"{v} {r['unet_max_abs_diff']:.1e}" for v, r in results.items()))  # fmt: skip
    return record


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side and variant")
    parser.add_argument("--variants", default="fp32", help="comma-separated, see above")
    parser.add_argument("--unet_heads", type=int, default=BENCH_CAT.unet.num_heads)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cond_dropout", type=float, default=0.0,
        help="conditioning dropout of both sides (the reference trains with 0.1; a dropped "
        "PyTorch step skips the inpainter's backward, so 0 keeps each step's work equal)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    cfg = dataclasses.replace(
        BENCH_CAT, unet=dataclasses.replace(BENCH_CAT.unet, num_heads=args.unet_heads)
    )
    return run(cfg, args.batch_size, args.resolution, args.steps, args.variants.split(","),
               args.seed, args.cond_dropout)  # fmt: skip


if __name__ == "__main__":
    main()
