"""The stage-2b training step as the PyTorch reference does it, for `bench/vs_pytorch.py`.

transformers CLIP text (run twice: the context, then again for the pooled label), CLIP vision
on the masked image, the diffusers VAE encoder on the image and on the masked image, the
semantic inpainter of SPEC.md §3 (tests/test_inpainter.py's PyTorch version), diffusers'
UNet2DConditionModel with the reference adapter of SPEC.md §2 added to every transformer block,
the MSE loss, backward and AdamW; eager, fp32.
"""

from __future__ import annotations

import dataclasses
import math
import time
import types
from collections.abc import Mapping

import diffusers
import numpy as np
import torch
import transformers
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from torch import nn

from catflax import diffusion
from catflax.models.cat import CATConfig
from catflax.models.unet import UNetConfig
from catflax.preprocess import CLIP_MEAN, CLIP_STD
from catflax.train.stages import FAST_PARAM_MARKERS
from tests.test_inpainter import TorchInpainter


# ============================================================================ the adapter
def _adapter_block_forward(
    self, hidden_states, attention_mask=None, encoder_hidden_states=None,
    encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None, class_labels=None,
    added_cond_kwargs=None,
):  # fmt: skip
    """BasicTransformerBlock ("layer_norm" type) with RefAttn between self- and cross-attention."""
    ref_tokens = (cross_attention_kwargs or {})["ref_tokens"]
    hidden_states = hidden_states + self.attn1(self.norm1(hidden_states))
    hidden_states = hidden_states + self.ref_attn(
        self.ref_norm(hidden_states), encoder_hidden_states=ref_tokens
    )
    hidden_states = hidden_states + self.attn2(
        self.norm2(hidden_states), encoder_hidden_states=encoder_hidden_states
    )
    return hidden_states + self.ff(self.norm3(hidden_states))


def add_reference_adapter(unet: diffusers.UNet2DConditionModel, ref_dim: int) -> int:
    """Adds ref_norm + ref_attn (PyTorch default init) to every transformer block; the UNet
    then takes `cross_attention_kwargs={"ref_tokens": (B,R,ref_dim)}`. Returns the block count."""
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    for block in blocks:
        dim, heads = block.norm1.normalized_shape[0], block.attn1.heads
        block.ref_norm = nn.LayerNorm(dim, eps=1e-5)
        block.ref_attn = Attention(
            query_dim=dim, cross_attention_dim=ref_dim, heads=heads, dim_head=dim // heads,
            bias=False, out_bias=True,
        )  # fmt: skip
        block.forward = types.MethodType(_adapter_block_forward, block)
    return len(blocks)


# ============================================================================ the models
@dataclasses.dataclass
class TorchModels:
    text: transformers.CLIPTextModel
    vision: transformers.CLIPVisionModel
    vae: diffusers.AutoencoderKL
    unet: diffusers.UNet2DConditionModel
    inpainter: TorchInpainter


def build(cfg: CATConfig, seed: int = 0) -> TorchModels:
    """PyTorch models of `cfg`'s sizes with their libraries' default initialisation."""
    torch.manual_seed(seed)
    t, v, a, u = cfg.clip_text, cfg.clip_vision, cfg.vae, cfg.unet
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=t.vocab_size, hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
            num_attention_heads=t.num_heads, max_position_embeddings=t.max_positions,
            hidden_act=t.hidden_act, layer_norm_eps=t.layer_norm_eps,
            eos_token_id=t.eos_token_id,
        )
    )  # fmt: skip
    vision = transformers.CLIPVisionModel(
        transformers.CLIPVisionConfig(
            hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
            image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.hidden_act,
            layer_norm_eps=v.layer_norm_eps,
        )
    )  # fmt: skip
    levels = len(a.block_out_channels)
    vae = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=a.block_out_channels, layers_per_block=a.layers_per_block,
        latent_channels=a.latent_channels, norm_num_groups=a.norm_num_groups,
    )  # fmt: skip
    return TorchModels(text.eval(), vision.eval(), vae.eval(), build_unet(u).train(),
                       TorchInpainter(cfg.inpainter).train())  # fmt: skip


def build_unet(u: UNetConfig) -> diffusers.UNet2DConditionModel:
    """diffusers' UNet of `u`'s sizes (no adapter yet), default initialisation."""
    down = ["CrossAttnDownBlock2D" if on else "DownBlock2D" for on in u.attention_levels]
    up = ["CrossAttnUpBlock2D" if on else "UpBlock2D" for on in u.attention_levels[::-1]]
    return diffusers.UNet2DConditionModel(
        in_channels=u.in_channels, out_channels=u.out_channels,
        block_out_channels=u.block_out_channels, down_block_types=down, up_block_types=up,
        layers_per_block=u.layers_per_block, cross_attention_dim=u.cross_attention_dim,
        attention_head_dim=u.num_heads,  # diffusers' SD-1.x configs name the head count so
        norm_num_groups=u.norm_num_groups, norm_eps=u.norm_eps,
    )  # fmt: skip


def load_numpy_state(module: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Strictly loads a PyTorch-style numpy state dict (e.g. `convert.export_state_dict`)."""
    module.load_state_dict({k: torch.from_numpy(np.asarray(v).copy()) for k, v in state.items()})


def make_optimizer(models: TorchModels, lr_fast: float, lr_slow: float, weight_decay: float):
    """AdamW with the reference's groups: inpainter + adapter fast, the rest of the UNet slow."""
    fast = list(models.inpainter.parameters())
    slow = []
    for name, p in models.unet.named_parameters():
        (fast if any(m in name.split(".") for m in FAST_PARAM_MARKERS) else slow).append(p)
    return torch.optim.AdamW(
        [{"params": fast, "lr": lr_fast}, {"params": slow, "lr": lr_slow}],
        weight_decay=weight_decay,
    )


# ============================================================================ the step
class ReferenceStep:
    """One stage-2b step on a host batch (numpy, our NHWC layout), the reference's way."""

    def __init__(self, models: TorchModels, opt, cond_dropout: float = 0.1, seed: int = 0):
        self.m, self.opt, self.cond_dropout = models, opt, cond_dropout
        self.gen = torch.Generator().manual_seed(seed)
        abar = torch.from_numpy(diffusion.alphas_cumprod())
        self.sqrt_abar, self.sqrt_1m_abar = abar.sqrt(), (1 - abar).sqrt()
        self.mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1)
        self.scale = 0.18215

    @staticmethod
    def to_torch(batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        nchw = ("image512", "masked512", "image224", "masked224", "mask64")
        return {
            k: torch.from_numpy(np.ascontiguousarray(v.transpose(0, 3, 1, 2) if k in nchw else v))
            for k, v in batch.items()
        }

    def __call__(self, b: Mapping[str, torch.Tensor], timings: dict | None = None) -> float:
        clock = _Clock(timings)
        m, B = self.m, b["input_ids"].shape[0]
        drop = torch.rand((), generator=self.gen).item() < self.cond_dropout
        ids = b["empty_ids"] if drop else b["input_ids"]
        with torch.no_grad():
            context = m.text(input_ids=ids).last_hidden_state  # the UNet's context ...
            label = m.text(input_ids=ids).pooler_output  # ... and again for the pooled label
            clock("clip text x2")
            pixels = (b["masked224"].float() / 255.0 - self.mean) / self.std
            vision = m.vision(pixel_values=pixels)
            clock("clip vision")
            latents = m.vae.encode(b["image512"]).latent_dist.sample(self.gen) * self.scale
            masked = m.vae.encode(b["masked512"]).latent_dist.sample(self.gen) * self.scale
            clock("vae encoder x2")
        t = torch.randint(0, 1000, (B,), generator=self.gen)
        noise = torch.randn(latents.shape, generator=self.gen)
        noisy = self.sqrt_abar[t].view(B, 1, 1, 1) * latents + self.sqrt_1m_abar[t].view(
            B, 1, 1, 1
        ) * noise  # fmt: skip
        tokens = m.inpainter(vision.last_hidden_state, b["mask16"], label, vision.pooler_output)[3]
        if drop:
            tokens = torch.zeros_like(tokens)
        clock("inpainter fwd")
        x = torch.cat([noisy, b["mask64"], masked], dim=1)
        eps = m.unet(x, t, context, cross_attention_kwargs={"ref_tokens": tokens}).sample
        loss = nn.functional.mse_loss(eps, noise)
        clock("unet fwd + loss")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        clock("backward")
        self.opt.step()
        clock("adamw")
        return loss.item()


class _Clock:
    """Adds the seconds since the last call to timings[name] (no-op when timings is None)."""

    def __init__(self, timings: dict | None):
        self.timings, self.last = timings, time.perf_counter()

    def __call__(self, name: str) -> None:
        if self.timings is not None:
            now = time.perf_counter()
            self.timings[name] = self.timings.get(name, 0.0) + now - self.last
            self.last = now


def unet_forward_backward(unet, x, t, context, tokens, noise) -> float:
    """The UNet alone: forward, MSE, backward into every UNet parameter."""
    unet.zero_grad(set_to_none=True)
    eps = unet(x, t, context, cross_attention_kwargs={"ref_tokens": tokens}).sample
    loss = nn.functional.mse_loss(eps, noise)
    loss.backward()
    return loss.item()


def param_count(module: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in module.parameters())
