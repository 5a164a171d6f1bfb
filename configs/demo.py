"""A tiny CAT-Diffusion that runs on a laptop CPU: random weights, generated data.

Run: python -m catflax.main --config=configs/demo.py --workdir=/tmp/catflax-demo
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    text = config.model.clip_text
    text.hidden_size, text.intermediate_size = 32, 64  # real 49408-token vocabulary
    text.num_layers, text.num_heads = 2, 2
    vision = config.model.clip_vision
    vision.image_size, vision.patch_size = 64, 4  # still a 16x16 patch grid
    vision.hidden_size, vision.intermediate_size = 32, 64
    vision.num_layers, vision.num_heads = 2, 2
    inpainter = config.model.inpainter  # widths follow the towers above: 32
    inpainter.hidden_size, inpainter.label_size = vision.hidden_size, text.hidden_size
    inpainter.intermediate_size = inpainter.label_intermediate_size = 64
    inpainter.spatial_intermediate_size = inpainter.global_intermediate_size = 64
    inpainter.num_layers, inpainter.num_heads = 2, 2
    unet = config.model.unet  # 2 levels, attention on the first; context/tokens widths: 32
    unet.block_out_channels, unet.attention_levels = (32, 64), (True, False)
    unet.layers_per_block, unet.num_heads, unet.norm_num_groups = 1, 2, 8
    unet.cross_attention_dim, unet.ref_dim = text.hidden_size, vision.hidden_size
    data = config.data  # generated shapes (built on first use), 64 px; CLIP side follows vision
    data.data_dir = ""  # "" = WORKDIR/data
    data.train_mixture = data.eval_mixture = "synthetic_shapes"
    data.resolution, data.eval_batch_size, data.num_workers = 64, 8, 0
    vae = config.model.vae  # still f=8 (4 levels), tiny widths
    vae.block_out_channels, vae.layers_per_block, vae.norm_num_groups = (8, 16, 16, 16), 1, 4
    config.mesh.data = -1  # all local devices on the batch
    config.train.batch_size = 8
    config.train.log_every = 10
    config.train.checkpoint_every = 50
    config.train.peak_flops_per_device = 1e11  # ~ one CPU core, for a meaningful MFU line
    for stage in config.stages:
        config[f"stage_{stage}"].steps = 60
    return config
