"""A tiny CATDiffusion and a random batch of the shapes the data pipeline produces, for tests."""

import numpy as np

from catflax.models.cat import CATConfig
from catflax.models.clip import CLIPTextConfig, CLIPVisionConfig
from catflax.models.inpainter import InpainterConfig
from catflax.models.unet import UNetConfig
from catflax.models.vae import VAEConfig

WIDTH = 16
TINY_CAT = CATConfig(
    clip_text=CLIPTextConfig(vocab_size=1000, hidden_size=WIDTH, intermediate_size=32,
                             num_layers=1, num_heads=2, eos_token_id=999),
    clip_vision=CLIPVisionConfig(image_size=32, patch_size=2, hidden_size=WIDTH,
                                 intermediate_size=32, num_layers=1, num_heads=2),
    vae=VAEConfig(block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=8),
    unet=UNetConfig(block_out_channels=(16, 32), attention_levels=(True, False),
                    layers_per_block=1, num_heads=2, norm_num_groups=8,
                    cross_attention_dim=WIDTH, ref_dim=WIDTH),
    inpainter=InpainterConfig(hidden_size=WIDTH, intermediate_size=32, num_layers=1, num_heads=2,
                              label_size=WIDTH, label_intermediate_size=32,
                              spatial_intermediate_size=32, global_intermediate_size=32),
)  # fmt: skip
RESOLUTION = 16  # image512 stand-in; VAE factor 2 -> 8x8 latents


def random_batch(batch: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    R, C, L = RESOLUTION, TINY_CAT.clip_vision.image_size, RESOLUTION // 2
    mask = rng.integers(0, 2, (batch, L, L, 1)).astype(np.float32)
    return dict(
        image512=rng.uniform(-1, 1, (batch, R, R, 3)).astype(np.float32),
        masked512=rng.uniform(-1, 1, (batch, R, R, 3)).astype(np.float32),
        image224=rng.integers(0, 256, (batch, C, C, 3)).astype(np.uint8),
        masked224=rng.integers(0, 256, (batch, C, C, 3)).astype(np.uint8),
        mask64=mask,
        mask16=rng.integers(0, 2, (batch, 16, 16)).astype(np.float32),
        input_ids=rng.integers(0, 998, (batch, 77)).astype(np.int32),
        empty_ids=np.full((batch, 77), 999, np.int32),
    )
