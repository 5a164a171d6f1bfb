"""LDM single-file and CAT-Diffusion checkpoints: the UNet through LDM names (parity with
diffusers), the full CAT layout (adapter as attn3/norm4, CLIP vision, fusion_model), bad files."""

import math
import types

import diffusers
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from catflax.models import clip
from catflax.models.unet import CAT_UNET, UNet, UNetConfig
from catflax.models.vae import SD15_VAE, AutoencoderKL
from catflax.weights import convert, diffusers_format, ldm
from catflax.weights.io import WeightFileError, write_safetensors
from tests.torch_utils import perturb_vectors

TINY_UNET = dict(
    sample_size=16, in_channels=9, out_channels=4, block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2, cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8,
)  # fmt: skip
TINY_VAE = dict(
    block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
)  # fmt: skip
TINY_TEXT = dict(vocab_size=100, hidden_size=24, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2, max_position_embeddings=16, eos_token_id=99,
                 bos_token_id=98, pad_token_id=99)  # fmt: skip
TINY_VISION = dict(image_size=28, patch_size=7, hidden_size=20, intermediate_size=32,
                   num_hidden_layers=1, num_attention_heads=2)  # fmt: skip
REF_DIM = 20  # the semantic tokens' width = the tiny CLIP vision width


def diffusers_unet_to_ldm(
    state, attention_levels, layers_per_block, prefix="model.diffusion_model."
):
    """diffusers UNet names -> LDM (CAT for the adapter) names, written independently of
    catflax.weights.ldm: LDM's blocks are enumerated as openaimodel.UNetModel builds them."""
    table = {
        "conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.", "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.", "mid_block.resnets.0.": "middle_block.0.",
        "mid_block.attentions.0.": "middle_block.1.", "mid_block.resnets.1.": "middle_block.2.",
    }  # fmt: skip
    last, block = len(attention_levels) - 1, 1
    for level, attention in enumerate(attention_levels):
        for j in range(layers_per_block):
            table[f"down_blocks.{level}.resnets.{j}."] = f"input_blocks.{block}.0."
            if attention:
                table[f"down_blocks.{level}.attentions.{j}."] = f"input_blocks.{block}.1."
            block += 1
        if level < last:
            table[f"down_blocks.{level}.downsamplers.0.conv."] = f"input_blocks.{block}.0.op."
            block += 1
    block = 0
    for level, attention in enumerate(attention_levels[::-1]):
        for j in range(layers_per_block + 1):
            table[f"up_blocks.{level}.resnets.{j}."] = f"output_blocks.{block}.0."
            if attention:
                table[f"up_blocks.{level}.attentions.{j}."] = f"output_blocks.{block}.1."
            block += 1
        if level < last:  # the upsampler follows the level's last resnet (and transformer)
            slot = 2 if attention else 1
            table[f"up_blocks.{level}.upsamplers.0.conv."] = (
                f"output_blocks.{block - 1}.{slot}.conv."
            )
    resnet = {
        "norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "time_emb_proj.": "emb_layers.1.",
        "norm2.": "out_layers.0.", "conv2.": "out_layers.3.", "conv_shortcut.": "skip_connection.",
    }  # fmt: skip
    out = {}
    for key, value in state.items():
        [src] = [p for p in table if key.startswith(p)]
        rest = key[len(src) :]
        if ".resnets." in src:
            [inner] = [p for p in resnet if rest.startswith(p)]
            rest = resnet[inner] + rest[len(inner) :]
        else:
            rest = rest.replace("ref_attn.", "attn3.").replace("ref_norm.", "norm4.")
        out[prefix + table[src] + rest] = value
    return out


class TorchAttention(torch.nn.Module):
    """SPEC.md §2's reference attention: q from x, k/v from the tokens (no bias), out with bias."""

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


def add_reference_adapter(unet: torch.nn.Module, ref_dim: int) -> dict:
    """Gives every diffusers transformer block the adapter, in the reference's order:
    attn1(norm1), attn3(norm4, tokens), attn2(norm2, text), ff(norm3). Tokens go in `holder`."""
    holder = {}

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, **_):
        x = hidden_states
        x = x + self.attn1(self.norm1(x))
        x = x + self.ref_attn(self.ref_norm(x), holder["tokens"])
        x = x + self.attn2(self.norm2(x), encoder_hidden_states=encoder_hidden_states)
        return x + self.ff(self.norm3(x))

    for block in list(unet.modules()):
        if type(block).__name__ == "BasicTransformerBlock":
            dim = block.norm1.normalized_shape[0]
            block.ref_norm = torch.nn.LayerNorm(dim)
            block.ref_attn = TorchAttention(dim, ref_dim, block.attn1.heads)
            perturb_vectors(block.ref_norm)
            block.forward = types.MethodType(forward, block)
    return holder


@nnx.jit
def forward(model, x, t, context, ref=None):
    return model(x, t, context, ref)


def unet_inputs(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((2, 16, 16, 9)).astype(np.float32), np.array([7, 950]),
            rng.standard_normal((2, 5, 24)).astype(np.float32),
            rng.standard_normal((2, 4, REF_DIM)).astype(np.float32))  # fmt: skip


def torch_forward(model, x, t, context):
    with torch.no_grad():
        out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                    torch.from_numpy(context)).sample  # fmt: skip
    return out.numpy().transpose(0, 2, 3, 1)


def tiny_unet_config(**kw) -> UNetConfig:
    return diffusers_format.unet_config_from_diffusers(dict(TINY_UNET), **kw)


def test_unet_from_ldm_single_file_matches_diffusers(tmp_path):
    torch.manual_seed(0)
    torch_unet = diffusers.UNet2DConditionModel(**TINY_UNET).eval()
    perturb_vectors(torch_unet)
    state = {k: v.numpy() for k, v in torch_unet.state_dict().items()}
    ldm_state = diffusers_unet_to_ldm(state, (True, True, False), layers_per_block=2)
    # The rest of an SD checkpoint: VAE, schedule buffers (ignored by the UNet loader).
    ldm_state |= {"first_stage_model.quant_conv.bias": np.zeros(8, np.float32),
                  "betas": np.linspace(0, 1, 10, dtype=np.float32)}  # fmt: skip
    path = str(tmp_path / "sd-inpainting.safetensors")
    write_safetensors(path, ldm_state)
    cfg = tiny_unet_config(ref_adapter=False)
    ours, report = UNet.from_pretrained(path, config=cfg, output_loading_info=True)
    assert len(report.loaded) == len(state) and not report.initialised
    x, t, context, _ = unet_inputs()
    ref = torch_forward(torch_unet, x, t, context)
    err = float(np.abs(np.asarray(forward(ours, x, t, context)) - ref).max())
    print(f"UNet vs diffusers (LDM single file): max abs error {err:.2e}")
    assert err < 1e-4


def test_ldm_names_of_the_full_size_unet_and_vae():
    """Our rename agrees with the enumeration above on every SD-1.5 + adapter parameter, and
    gives the names known from the SD-1.5 and CAT-Diffusion checkpoints."""
    abstract = nnx.eval_shape(lambda: UNet(CAT_UNET, rngs=nnx.Rngs(0)))
    names = {n.key: n.key for n in convert.torch_names(abstract).values()}
    expected = diffusers_unet_to_ldm(names, CAT_UNET.attention_levels, 2)
    ours = {"model.diffusion_model." + ldm.unet_ldm_name(k, CAT_UNET): k for k in names}
    assert {v: k for k, v in expected.items()} == {v: k for k, v in ours.items()}
    known = [
        "input_blocks.0.0.weight", "input_blocks.3.0.op.weight",
        "input_blocks.4.0.skip_connection.weight", "input_blocks.11.0.out_layers.3.weight",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", "middle_block.1.proj_in.weight",
        "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
        "output_blocks.8.2.conv.weight", "output_blocks.11.1.transformer_blocks.0.ff.net.2.weight",
        "time_embed.2.bias", "out.2.weight",
        "input_blocks.1.1.transformer_blocks.0.attn3.to_k.weight",  # the adapter, CAT's names
        "output_blocks.11.1.transformer_blocks.0.norm4.bias",
    ]  # fmt: skip
    assert {"model.diffusion_model." + k for k in known} <= set(ours)
    vae = nnx.eval_shape(lambda: AutoencoderKL(SD15_VAE, rngs=nnx.Rngs(0)))
    vae_names = {ldm.vae_ldm_name(n.key, SD15_VAE) for n in convert.torch_names(vae).values()}
    assert {
        "encoder.down.1.block.0.nin_shortcut.weight", "encoder.mid.attn_1.q.weight",
        "decoder.up.1.block.0.nin_shortcut.weight", "decoder.up.3.upsample.conv.weight",
        "decoder.norm_out.bias", "encoder.down.2.downsample.conv.weight",
    } <= vae_names  # fmt: skip
    assert (
        not {"decoder.up.0.upsample.conv.weight", "encoder.down.3.downsample.conv.weight"}
        & vae_names
    )


def test_reference_export_has_the_official_checkpoint_names():
    """Every name of the reference model's state dict (tests/fixtures: generated from the
    reference's own modules, not from catflax), and no other, comes out of our reference-format
    export, each with the reference's rank. At full depth and with widths that change where
    the full model's do (which decides the shortcut convs), but narrow: names depend on no
    more, and the full model would need 7 GB."""
    import dataclasses
    import json
    import os

    from catflax.models.cat import CATConfig, CATDiffusion
    from catflax.models.inpainter import InpainterConfig
    from catflax.models.rngs import rngs
    from catflax.weights.ldm import ddpm_buffers, reference_state_dict

    with open(
        os.path.join(os.path.dirname(__file__), "fixtures", "reference_state_dict_shapes.json")
    ) as f:
        golden = json.load(f)["keys"]
    narrow = dict(hidden_size=32, intermediate_size=64, num_heads=2)
    cfg = CATConfig(
        clip_text=dataclasses.replace(clip.CLIP_VIT_L14_TEXT, **narrow),
        clip_vision=dataclasses.replace(clip.CLIP_VIT_L14_VISION, **narrow),
        vae=dataclasses.replace(SD15_VAE, block_out_channels=(32, 64, 128, 128)),
        unet=dataclasses.replace(CAT_UNET, block_out_channels=(32, 64, 128, 128), num_heads=2,
                                 cross_attention_dim=32, ref_dim=32),
        inpainter=InpainterConfig(**narrow, label_size=32, label_intermediate_size=64,
                                  spatial_intermediate_size=64, global_intermediate_size=64),
    )  # fmt: skip
    exported = reference_state_dict(CATDiffusion(cfg, rngs=rngs(0)))
    buffers = ddpm_buffers()
    ours = {k: v.ndim for k, v in exported.items() if k not in buffers}
    assert sorted(set(golden) - set(ours)) == [] and sorted(set(ours) - set(golden)) == []
    assert {k: len(v) for k, v in golden.items()} == ours


@pytest.fixture(scope="module")
def cat_checkpoint():
    """A tiny CAT-Diffusion checkpoint in the reference's layout, and its PyTorch pieces."""
    torch.manual_seed(1)
    unet = diffusers.UNet2DConditionModel(**TINY_UNET).eval()
    perturb_vectors(unet)
    holder = add_reference_adapter(unet, REF_DIM)
    vae = diffusers.AutoencoderKL(**TINY_VAE).eval()
    perturb_vectors(vae)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_TEXT)).eval()
    vision = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_VISION)).eval()
    numpy = lambda m: {k: v.numpy() for k, v in m.state_dict().items()}  # noqa: E731
    state = diffusers_unet_to_ldm(numpy(unet), (True, True, False), layers_per_block=2)
    assert "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn3.to_v.weight" in state
    # The VAE through our own LDM export (its LDM names are checked independently in test_vae).
    vae_cfg = diffusers_format.vae_config_from_diffusers(dict(TINY_VAE))
    ours_vae, _ = AutoencoderKL.from_state_dict(vae_cfg, numpy(vae), source_name="vae")
    state |= ldm.vae_to_ldm(ours_vae)
    # The reference's transformers 4 nests the towers under text_model. / vision_model.
    state |= {"cond_stage_model.transformer.text_model." + k: v for k, v in numpy(text).items()}
    state |= {"cond_stage_model2.encoder.vision_model." + k: v for k, v in numpy(vision).items()}
    # Buffers older transformers saved, the schedule, and the semantic inpainter.
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = np.arange(16)[None]
    state["cond_stage_model2.encoder.vision_model.embeddings.position_ids"] = np.arange(17)[None]
    state |= {"betas": np.linspace(1e-4, 2e-2, 10), "alphas_cumprod": np.ones(10),
              "fusion_model.pos_embedding.weight": np.ones((4, REF_DIM), np.float32),
              "fusion_model.encoder.layers.0.mlp.fc1.bias": np.arange(3.0)}  # fmt: skip
    return state, dict(unet=unet, holder=holder, vae=vae, text=text, vision=vision)


def test_cat_checkpoint_loads_every_component(tmp_path, cat_checkpoint):
    state, torch_parts = cat_checkpoint
    path = str(tmp_path / "cat.safetensors")
    write_safetensors(path, state)
    configs = dict(
        unet=tiny_unet_config(ref_dim=REF_DIM),
        vae=diffusers_format.vae_config_from_diffusers(dict(TINY_VAE)),
        clip_text=clip.text_config_from_hf(TINY_TEXT),
        clip_vision=clip.vision_config_from_hf(TINY_VISION),
    )
    cat = ldm.load_cat_checkpoint(path, fusion_loader=lambda sd: sorted(sd), **configs)
    assert cat.fusion_model == ["encoder.layers.0.mlp.fc1.bias", "pos_embedding.weight"]
    assert cat.ignored == ["alphas_cumprod", "betas"]

    x, t, context, tokens = unet_inputs(1)
    torch_parts["holder"]["tokens"] = torch.from_numpy(tokens)
    ref = torch_forward(torch_parts["unet"], x, t, context)
    err = float(np.abs(np.asarray(forward(cat.unet, x, t, context, tokens)) - ref).max())
    print(f"CAT UNet (adapter as attn3/norm4) vs PyTorch: max abs error {err:.2e}")
    assert err < 1e-4
    # The other towers hold exactly the PyTorch weights.
    for ours, theirs in ((cat.vae, "vae"), (cat.clip_text, "text"), (cat.clip_vision, "vision")):
        exported = convert.export_state_dict(ours)
        if theirs != "vae":  # transformers 5 names: no text_model. / vision_model. level
            exported = {k.split(".", 1)[1].replace("pre_layernorm", "pre_layrnorm"): v
                        for k, v in exported.items()}  # fmt: skip
        reference = torch_parts[theirs].state_dict()
        assert set(exported) <= set(reference)
        for key, value in exported.items():
            np.testing.assert_array_equal(value, reference[key].numpy(), err_msg=key)
    # Export back to the CAT layout gives the file's UNet and VAE tensors.
    for key, value in (ldm.unet_to_ldm(cat.unet) | ldm.vae_to_ldm(cat.vae)).items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)


def test_pickled_checkpoints_need_opt_in(tmp_path, cat_checkpoint):
    state, _ = cat_checkpoint
    path = str(tmp_path / "cat.ckpt")
    torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in state.items()}}, path)
    cfg = tiny_unet_config(ref_dim=REF_DIM)
    with pytest.raises(
        WeightFileError, match=r"cat\.ckpt: pickled checkpoints .* allow_pickle=True"
    ):
        UNet.from_pretrained(path, config=cfg)
    ours = UNet.from_pretrained(path, config=cfg, allow_pickle=True)  # torch.load(weights_only)
    for key, value in ldm.unet_to_ldm(ours).items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)


def test_bad_checkpoints_are_clear_errors(tmp_path, cat_checkpoint):
    state, _ = cat_checkpoint
    path = tmp_path / "cat.safetensors"
    write_safetensors(str(path), state)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    cfg = tiny_unet_config(ref_dim=REF_DIM)
    with pytest.raises(WeightFileError, match=r"truncated\.safetensors: truncated"):
        UNet.from_pretrained(str(truncated), config=cfg)
    vae_only = tmp_path / "vae.safetensors"
    write_safetensors(str(vae_only), {k: v for k, v in state.items() if "first_stage" in k})
    with pytest.raises(WeightFileError, match="no UNet weights"):
        UNet.from_pretrained(str(vae_only), config=cfg)
    no_fusion = tmp_path / "sd.safetensors"
    write_safetensors(str(no_fusion), {k: v for k, v in state.items() if "fusion" not in k})
    with pytest.raises(WeightFileError, match="not a CAT-Diffusion checkpoint"):
        ldm.load_cat_checkpoint(str(no_fusion), unet=cfg)
    # An SD-1.5-inpainting UNet lacks the adapter: an error unless the caller opts in.
    sd = tmp_path / "sd-unet.safetensors"
    write_safetensors(
        str(sd), {k: v for k, v in state.items() if "attn3" not in k and "norm4" not in k}
    )
    with pytest.raises(convert.WeightLoadError, match="init_missing_adapter") as info:
        UNet.from_pretrained(str(sd), config=cfg)
    assert "transformer_blocks.0.attn3.to_q.weight" in str(info.value)
    _, report = UNet.from_pretrained(str(sd), config=cfg, init_missing_adapter=True,
                                     output_loading_info=True)  # fmt: skip
    assert len(report.initialised) == 77 and all("ref_" in p for p in report.initialised)
