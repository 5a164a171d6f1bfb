"""CAT-Diffusion at full size (SPEC.md §1) on COCO 2017 instances.

Run: python -m catflax.main --config=configs/coco.py --workdir=gs://BUCKET/catflax/coco \
    --config.weights.clip=DIR --config.weights.sd=DIR --config.data.data_dir=gs://BUCKET/tfds
(the weight paths below are placeholders; training refuses to start without them)
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    # Full sizes are base's: CLIP ViT-L/14 text (12x768) and vision (24x1024).
    config.weights.clip = "/data/weights/clip-vit-large-patch14"  # transformers directory
    config.weights.sd = "/data/weights/stable-diffusion-inpainting"  # diffusers dir or LDM file
    # COCO instances in place of base's OpenImages, with the reference's 20% of text-image pairs
    # (build both with `python -m catflax.data.prepare`, into config.data.data_dir).
    config.data.train_mixture = "coco_inpaint:0.8,text_image_pairs:0.2"
    config.data.eval_mixture = "coco_inpaint"
    return config
