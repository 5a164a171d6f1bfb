"""The CPU benchmark model (bench/vs_pytorch.py's) as a run config, random weights.

UNet 64-128-256-256 (SD-1.5's layout at 1/5 width; 2 heads, so head sizes 32/64/128 near SD's
40/80/160), 4-layer CLIP towers and inpainter of width 256, VAE 32-64-128-128; 256 px images ->
32x32 latents, 112 px CLIP input (16x16 grid); batch 4; no conditioning dropout (the PyTorch
step's work then equals ours every step). Ours alone, on any jax:

    python bench/train_step.py --config=configs/cpu_bench.py --stages=2b --steps=5 \
        --config.model.unet.attention=chunked
"""

import dataclasses

import ml_collections

from catflax.models.cat import CATConfig
from catflax.models.clip import CLIPTextConfig, CLIPVisionConfig
from catflax.models.inpainter import InpainterConfig
from catflax.models.unet import UNetConfig
from catflax.models.vae import VAEConfig
from configs import base

MODEL = CATConfig(
    clip_text=CLIPTextConfig(hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4),
    clip_vision=CLIPVisionConfig(image_size=112, patch_size=7, hidden_size=256,
                                 intermediate_size=1024, num_layers=4, num_heads=4),
    vae=VAEConfig(block_out_channels=(32, 64, 128, 128), layers_per_block=2, norm_num_groups=16),
    unet=UNetConfig(block_out_channels=(64, 128, 256, 256), num_heads=2, cross_attention_dim=256,
                    ref_dim=256),
    inpainter=InpainterConfig(hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4,
                              label_size=256, label_intermediate_size=1024,
                              spatial_intermediate_size=1024, global_intermediate_size=1024),
)  # fmt: skip


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    for part in ("clip_text", "clip_vision", "vae", "unet", "inpainter"):
        config.model[part] = dataclasses.asdict(getattr(MODEL, part))
    config.data.resolution = 256
    config.train.batch_size = 4
    config.train.cond_dropout = 0.0  # the same work on both sides every step
    return config
