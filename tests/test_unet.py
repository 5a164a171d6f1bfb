"""UNet: parity with diffusers' UNet2DConditionModel (PyTorch), the reference adapter of SPEC.md §2
against a PyTorch block written here, adapter initialisation on load, full-size counts."""

import dataclasses
import json
import math
import os

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from catflax.models.unet import (
    SD15_INPAINTING_UNET,
    BasicTransformerBlock,
    MidBlock,
    UNet,
    UNetConfig,
    adapter_param_count,
    is_adapter_param,
)
from catflax.models.vae import SD15_VAE, AutoencoderKL, VAEConfig
from catflax.weights import convert, diffusers_format
from catflax.weights.io import WeightFileError, write_safetensors
from tests.torch_utils import perturb_vectors

TINY = dict(
    sample_size=16, in_channels=9, out_channels=4, block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2, cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8,
)  # fmt: skip
# As published in runwayml/stable-diffusion-inpainting unet/ and vae/ config.json.
SD15_INPAINTING_UNET_JSON = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 9,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
}  # fmt: skip
SD15_VAE_JSON = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory):
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(**TINY).eval()
    perturb_vectors(model)
    root = tmp_path_factory.mktemp("sd15")
    model.save_pretrained(root / "unet")  # a pipeline root, as SD-1.5-inpainting is shipped
    return model, root


def unet_inputs(seed: int = 0, batch: int = 2):
    rng = np.random.default_rng(seed)
    x_BHWC = rng.standard_normal((batch, 16, 16, 9)).astype(np.float32)
    t_B = np.array([3, 981][:batch])
    context_BLC = rng.standard_normal((batch, 7, 24)).astype(np.float32)
    return x_BHWC, t_B, context_BLC


@nnx.jit
def forward(model, x, t, context, ref=None):
    return model(x, t, context, ref)


def torch_forward(model, x_BHWC, t_B, context):
    with torch.no_grad():
        out = model(torch.from_numpy(x_BHWC.transpose(0, 3, 1, 2)), torch.from_numpy(t_B),
                    torch.from_numpy(context)).sample  # fmt: skip
    return out.numpy().transpose(0, 2, 3, 1)


def test_unet_matches_diffusers_directory(tiny_unet):
    torch_model, root = tiny_unet
    ours, report = UNet.from_pretrained(str(root), ref_adapter=False, output_loading_info=True)
    cfg = ours.config
    assert (cfg.block_out_channels, cfg.attention_levels) == ((32, 64, 64), (True, True, False))
    assert (cfg.num_heads, cfg.cross_attention_dim, cfg.in_channels) == (4, 24, 9)
    assert not report.initialised and len(report.loaded) == len(torch_model.state_dict())
    x, t, context = unet_inputs()
    ref = torch_forward(torch_model, x, t, context)
    err = float(np.abs(np.asarray(forward(ours, x, t, context)) - ref).max())
    print(f"UNet vs diffusers (directory): max abs error {err:.2e}")
    assert err < 1e-4
    # The unet/ folder itself loads too.
    direct = UNet.from_pretrained(str(root / "unet"), ref_adapter=False)
    out = forward(direct, x[::-1], t[::-1], context[::-1])
    np.testing.assert_allclose(out, ref[::-1], atol=1e-4)
    # Run-time choices (a remat policy) are not sizes to check against config.json; an unknown
    # option is named.
    remat = UNet.from_pretrained(str(root), ref_adapter=False, remat=True, remat_policy="dots")
    assert remat.config.remat_policy == "dots"
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['dtpye'\] for UNetConfig"):
        UNet.from_pretrained(str(root), ref_adapter=False, dtpye="bfloat16")


def test_fp16_variant_files_load_single_and_sharded(tiny_unet, tmp_path):
    """diffusers' `save_pretrained(variant="fp16")`, as SD checkpoints are often shipped: one
    file, or shards with an index; several variants and no plain file must be chosen between."""
    from catflax.weights import io

    torch_model, _ = tiny_unet
    half = diffusers.UNet2DConditionModel(**TINY).eval()
    half.load_state_dict(torch_model.state_dict())
    half.half().save_pretrained(tmp_path / "single", variant="fp16")
    half.save_pretrained(tmp_path / "sharded", variant="fp16", max_shard_size="100KB")
    assert any("fp16-00002-of" in name for name in os.listdir(tmp_path / "sharded"))
    want = {k: v.float().numpy() for k, v in half.state_dict().items()}
    for folder in ("single", "sharded"):
        state = io.read_state_dict(str(tmp_path / folder))
        assert state.keys() == want.keys() and all(v.dtype == np.float16 for v in state.values())
        model = UNet.from_pretrained(str(tmp_path / folder), ref_adapter=False)
        kernel = np.asarray(model.conv_in.kernel.get_value())
        assert kernel.dtype == np.float32
        np.testing.assert_array_equal(kernel, want["conv_in.weight"].transpose(2, 3, 1, 0))
    half.save_pretrained(tmp_path / "single", variant="ema")
    with pytest.raises(io.WeightFileError, match=r"the variants \['ema', 'fp16'\]; pick one"):
        io.read_state_dict(str(tmp_path / "single"))
    assert io.read_state_dict(str(tmp_path / "single"), variant="ema").keys() == want.keys()
    picked = UNet.from_pretrained(str(tmp_path / "single"), ref_adapter=False, variant="fp16")
    np.testing.assert_array_equal(
        np.asarray(picked.conv_in.kernel.get_value()), want["conv_in.weight"].transpose(2, 3, 1, 0)
    )
    with pytest.raises(ValueError, match="variant='fp16' picks files in a model directory"):
        UNet.from_pretrained(str(tmp_path / "x.safetensors"), variant="fp16")
    # A plain pickle beside a safetensors variant: the safetensors file is the one read.
    torch.save(half.state_dict(), tmp_path / "sharded" / "diffusion_pytorch_model.bin")
    first = os.path.basename(io.find_weight_file(str(tmp_path / "sharded"))[0])
    assert first.startswith("diffusion_pytorch_model.fp16-00001-of-")
    # Only a pickled variant: loads with allow_pickle, and only then.
    (tmp_path / "pickled").mkdir()
    torch.save(half.state_dict(), tmp_path / "pickled" / "diffusion_pytorch_model.fp16.bin")
    with pytest.raises(io.WeightFileError, match="no weights found"):
        io.find_weight_file(str(tmp_path / "pickled"))
    found = io.find_weight_file(str(tmp_path / "pickled"), allow_pickle=True)
    assert [os.path.basename(f) for f in found] == ["diffusion_pytorch_model.fp16.bin"]


# ---------------------------------------------------------------------------------------------
# The reference adapter: a PyTorch transformer block written from SPEC.md §2
# ---------------------------------------------------------------------------------------------


class TorchAttention(torch.nn.Module):
    """Multi-head attention: q from x (no bias), k/v from the context (no bias), out with bias."""

    def __init__(self, dim, context_dim, heads):
        super().__init__()
        self.heads = heads
        self.to_q = torch.nn.Linear(dim, dim, bias=False)
        self.to_k = torch.nn.Linear(context_dim, dim, bias=False)
        self.to_v = torch.nn.Linear(context_dim, dim, bias=False)
        self.to_out = torch.nn.ModuleList([torch.nn.Linear(dim, dim)])

    def forward(self, x, context):
        B, T, D = x.shape
        split = lambda t: t.reshape(B, t.shape[1], self.heads, D // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // self.heads), dim=-1)
        return self.to_out[0]((weights @ v).transpose(1, 2).reshape(B, T, D))


class TorchGEGLU(torch.nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = torch.nn.Linear(dim, 2 * inner)

    def forward(self, x):
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * torch.nn.functional.gelu(gate)


class SpecBlock(torch.nn.Module):
    """SPEC.md §2: self-attn, reference attn on semantic tokens, cross-attn on text, GEGLU FF."""

    def __init__(self, dim, heads, context_dim, ref_dim):
        super().__init__()
        self.norm1, self.ref_norm = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.norm2, self.norm3 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.attn1 = TorchAttention(dim, dim, heads)
        self.ref_attn = TorchAttention(dim, ref_dim, heads)
        self.attn2 = TorchAttention(dim, context_dim, heads)
        self.ff = torch.nn.Module()
        self.ff.net = torch.nn.ModuleList(
            [TorchGEGLU(dim, 4 * dim), torch.nn.Dropout(0.0), torch.nn.Linear(4 * dim, dim)]
        )

    def forward(self, x, context, ref_tokens):
        h = self.norm1(x)
        x = x + self.attn1(h, h)
        x = x + self.ref_attn(self.ref_norm(x), ref_tokens)
        x = x + self.attn2(self.norm2(x), context)
        h = self.norm3(x)
        for layer in self.ff.net:
            h = layer(h)
        return x + h


def test_adapter_block_matches_spec():
    torch.manual_seed(1)
    block = SpecBlock(dim=32, heads=4, context_dim=24, ref_dim=20).eval()
    perturb_vectors(block)
    cfg = UNetConfig(block_out_channels=(32,), attention_levels=(True,), num_heads=4,
                     cross_attention_dim=24, ref_dim=20, norm_num_groups=8)  # fmt: skip
    abstract = nnx.eval_shape(lambda: BasicTransformerBlock(32, cfg, rngs=nnx.Rngs(0)))
    state = {k: v.numpy() for k, v in block.state_dict().items()}
    ours, _ = convert.load_state_dict(abstract, state, source_name="SpecBlock")
    rng = np.random.default_rng(1)
    x, context, ref_tokens = (rng.standard_normal(s).astype(np.float32)
                              for s in ((2, 48, 32), (2, 7, 24), (2, 9, 20)))  # fmt: skip
    with torch.no_grad():
        expected = block(*map(torch.from_numpy, (x, context, ref_tokens))).numpy()
    err = float(np.abs(np.asarray(ours(x, context, ref_tokens)) - expected).max())
    print(f"adapter block vs SPEC.md §2 PyTorch block: max abs error {err:.2e}")
    assert err < 1e-5


def test_missing_adapter_only_with_consent(tiny_unet):
    torch_model, root = tiny_unet
    with pytest.raises(convert.WeightLoadError, match="init_missing_adapter=True") as info:
        UNet.from_pretrained(str(root), ref_dim=20)
    assert "ref_attn.to_q.weight" in str(info.value)

    ours, report = UNet.from_pretrained(
        str(root), ref_dim=20, init_missing_adapter=True, seed=3, output_loading_info=True
    )
    # 11 transformer blocks (2x2 down, 1 mid, 2x3 up), 7 adapter tensors each.
    assert len(report.initialised) == 77 and all(map(is_adapter_param, report.initialised))
    assert "initialised 77" in report.summary()
    exported = convert.export_state_dict(ours)
    for key, value in torch_model.state_dict().items():
        np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)
    # PyTorch defaults: LayerNorm 1/0, Linear weights and bias U(+-1/sqrt(fan_in)).
    block = ours.down_blocks[0].attentions[0].transformer_blocks[0]
    np.testing.assert_array_equal(block.ref_norm.scale[...], np.ones(32))
    np.testing.assert_array_equal(block.ref_norm.bias[...], np.zeros(32))
    for linear, fan_in in ((block.ref_attn.to_k, 20), (block.ref_attn.to_out[0], 32)):
        w, bound = np.asarray(linear.kernel[...]), 1 / math.sqrt(fan_in)
        assert np.abs(w).max() <= bound and abs(w.std() - bound / math.sqrt(3)) < 0.15 * bound
    bias = np.asarray(block.ref_attn.to_out[0].bias[...])
    assert np.abs(bias).max() <= 1 / math.sqrt(32) and bias.std() > 0
    # A whole config (e.g. config.model.unet) may set run-time fields, not contradict the file.
    tiny = dataclasses.replace(ours.config, attention="chunked", remat=True)
    assert UNet.from_pretrained(str(root), config=tiny, init_missing_adapter=True).config == tiny
    with pytest.raises(WeightFileError, match="num_heads is 4 in the file, but 8"):
        UNet.from_pretrained(str(root), config=dataclasses.replace(tiny, num_heads=8))
    # (Its forward pass against PyTorch: test_ldm_loading.py's CAT checkpoint test.)
    x, t, context = unet_inputs()
    with pytest.raises(ValueError, match="ref_tokens"):
        ours(x, t, context)


def test_wrong_in_channels_is_a_clear_error(tmp_path):
    torch.manual_seed(0)
    text_to_image = diffusers.UNet2DConditionModel(**{**TINY, "in_channels": 4})
    text_to_image.save_pretrained(tmp_path / "t2i")
    with pytest.raises(WeightFileError, match=r"in_channels is 4 in the file, but 9"):
        UNet.from_pretrained(str(tmp_path / "t2i"), in_channels=9, ref_adapter=False)
    # config.json says 9 but the weights have 4 input channels.
    cfg = json.loads((tmp_path / "t2i" / "config.json").read_text())
    (tmp_path / "t2i" / "config.json").write_text(json.dumps({**cfg, "in_channels": 9}))
    with pytest.raises(convert.WeightLoadError, match="takes 4 input channels, this one 9"):
        UNet.from_pretrained(str(tmp_path / "t2i"), ref_adapter=False)
    # The same weights as a single file.
    state = {k: v.numpy() for k, v in text_to_image.state_dict().items()}
    write_safetensors(str(tmp_path / "t2i.safetensors"), state)
    tiny = diffusers_format.unet_config_from_diffusers(dict(TINY), ref_adapter=False)
    with pytest.raises(convert.WeightLoadError, match=r"conv_in.weight: \(32, 4, 3, 3\)"):
        UNet.from_pretrained(str(tmp_path / "t2i.safetensors"), config=tiny)


def random_model(make):
    """The module `make()` builds, with random weights drawn on the host (XLA:CPU compiles
    jax.random calls slowly, so nothing is initialised under jit)."""
    abstract = nnx.eval_shape(make)
    rng, state, names = np.random.default_rng(0), {}, convert.torch_names(abstract)
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        shape = var.get_value().shape
        if path[-1] == "kernel":
            value = rng.uniform(-1, 1, shape) / math.sqrt(math.prod(shape[:-1]))
        else:
            value = (path[-1] == "scale") + 0.1 * rng.standard_normal(shape)
        state[names[path].key] = convert.to_torch(value.astype(np.float32), names[path].layout)
    model, _ = convert.load_state_dict(abstract, state, source_name="random")
    return model


def test_remat_and_bfloat16_compute():
    cfg = UNetConfig(block_out_channels=(16,), attention_levels=(True,), layers_per_block=1,
                     num_heads=2, cross_attention_dim=8, ref_dim=8, norm_num_groups=8)  # fmt: skip
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 16))
    context, tokens = jax.random.normal(jax.random.key(1), (2, 2, 5, 8))
    temb = jax.random.normal(jax.random.key(2), (2, cfg.time_embed_dim))

    # The mid block: res block, transformer (its blocks remat'ed inside), res block.
    def value_and_grad(c):
        block = random_model(lambda: MidBlock(16, c, rngs=nnx.Rngs(0)))
        loss = lambda m: jnp.mean(jnp.sin(m(x, temb, context, tokens)))  # noqa: E731
        return nnx.jit(nnx.value_and_grad(loss))(block)

    loss, grads = value_and_grad(cfg)
    for policy in ("full", "dots"):
        loss_remat, grads_remat = value_and_grad(
            dataclasses.replace(cfg, remat=True, remat_policy=policy)
        )
        np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads_remat, grads)
    with pytest.raises(ValueError, match="remat_policy='most' is not one of"):
        MidBlock(16, dataclasses.replace(cfg, remat=True, remat_policy="most"), rngs=nnx.Rngs(0))

    # bfloat16 compute, float32 parameters: close to the float32 block.
    full = random_model(lambda: MidBlock(16, cfg, rngs=nnx.Rngs(0)))
    half_cfg = dataclasses.replace(cfg, dtype="bfloat16")
    half = random_model(lambda: MidBlock(16, half_cfg, rngs=nnx.Rngs(0)))
    assert half.resnets[0].conv1.kernel[...].dtype == jnp.float32
    run = nnx.jit(lambda m, *inputs: m(*inputs))
    inputs = (x, temb, context, tokens)
    out_full, out_half = run(full, *inputs), run(half, *(a.astype(jnp.bfloat16) for a in inputs))
    assert out_half.dtype == jnp.bfloat16
    scale = float(jnp.abs(out_full).max())
    assert float(jnp.abs(out_half.astype(jnp.float32) - out_full).max()) < 0.05 * scale


def test_full_size_counts_match_diffusers():
    """SD-1.5-inpainting's UNet and VAE built from their published configs (PyTorch meta device)
    have exactly the parameter counts of ours at configs/coco.py's sizes (what
    `python -m catflax.main --config=configs/coco.py --config.dry_run=True` prints)."""
    from configs import coco

    with torch.device("meta"):
        sd_unet = diffusers.UNet2DConditionModel(**SD15_INPAINTING_UNET_JSON)
        sd_vae = diffusers.AutoencoderKL(**SD15_VAE_JSON)
    n_unet = sum(p.numel() for p in sd_unet.parameters())
    n_vae = sum(p.numel() for p in sd_vae.parameters())
    # The adapter per transformer block of width d: LayerNorm 2d, q d*d, k and v 1024*d each,
    # out d*d + d.
    widths = [m.norm1.normalized_shape[0] for m in sd_unet.modules()
              if type(m).__name__ == "BasicTransformerBlock"]  # fmt: skip
    n_adapter = sum(2 * d + 2 * d * d + 2 * 1024 * d + d for d in widths)
    assert len(widths) == 16

    from_json = diffusers_format.unet_config_from_diffusers
    assert from_json(SD15_INPAINTING_UNET_JSON, ref_adapter=False) == SD15_INPAINTING_UNET
    assert diffusers_format.vae_config_from_diffusers(SD15_VAE_JSON) == SD15_VAE

    model = coco.get_config().model
    unet = nnx.eval_shape(lambda: UNet(UNetConfig(**model.unet), rngs=nnx.Rngs(0)))
    vae = nnx.eval_shape(lambda: AutoencoderKL(VAEConfig(**model.vae), rngs=nnx.Rngs(0)))
    assert adapter_param_count(unet) == n_adapter == 50_377_280
    assert convert.count_params(unet) == n_unet + n_adapter == 859_535_364 + n_adapter
    assert convert.count_params(vae) == n_vae == 83_653_863


def test_a_component_folder_of_the_wrong_kind_or_a_renamed_pickle_is_named(tiny_unet, tmp_path):
    torch_model, root = tiny_unet
    with pytest.raises(WeightFileError, match="a UNet2DConditionModel config where the vae"):
        AutoencoderKL.from_pretrained(str(root / "unet"))
    renamed = tmp_path / "unet.pkl"
    torch.save(torch_model.state_dict(), renamed)  # a pickle under a name no loader expects
    with pytest.raises(WeightFileError, match=r"unet\.pkl: a pickled PyTorch file"):
        UNet.from_pretrained(str(renamed), ref_adapter=False)
