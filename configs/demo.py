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
    return config
