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
    vision.num_layers, vision.num_heads = 1, 2
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
    data.data_dir = ""  # "" = WORKDIR/data (each host's ~/catflax-data for a gs:// workdir)
    data.train_mixture = data.eval_mixture = "synthetic_shapes"
    data.resolution, data.eval_batch_size, data.num_workers = 64, 8, 0
    vae = config.model.vae  # still f=8 (4 levels), the narrowest widths pooling_vae takes
    vae.block_out_channels, vae.layers_per_block, vae.norm_num_groups = (6, 6, 6, 6), 1, 3
    # Frozen parts start random, but a random frozen VAE cannot decode colours: this one averages
    # 8x8 pixel blocks into latents and copies them back (catflax/weights/pooling_vae.py).
    config.weights.pooling_vae = True
    config.weights.random_frozen = True  # random CLIP towers, on purpose
    config.mesh.data = -1  # all local devices on the batch
    config.train.batch_size = 16
    config.train.log_every = 50
    config.train.checkpoint_every = 500
    config.sampling.num_steps = 20  # DDIM steps of the stage-end grids and the report
    # The UNet trains from scratch here, so every group gets the fast rate (the reference's 1e-5
    # is for a pretrained UNet). Most steps go to the UNet (1b) and the end-to-end stage (2b).
    for stage, steps in (("1a", 100), ("1b", 700), ("2a", 100), ("2b", 800)):
        config[f"stage_{stage}"].steps = steps
        config[f"stage_{stage}"].lr_fast = 2e-3
        config[f"stage_{stage}"].lr_slow = 2e-3 if stage in ("1b", "2b") else 0.0
    config.stage_1a.plateau_every, config.stage_1a.plateau_eval_batches = 25, 4
    # At the end: WORKDIR/export, WORKDIR/samples.png and a printed report with a colour check
    # (catflax/report.py): prompted colour vs. the dominant colour in the mask, held-out images.
    config.report.enabled = True
    return config
