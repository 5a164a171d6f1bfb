"""Shared defaults for every catflax run; variants override what differs.

Run: python -m catflax.main --config=configs/base.py --workdir=/tmp/catflax
"""

import dataclasses

import ml_collections

from catflax.models.clip import CLIP_VIT_L14_TEXT, CLIP_VIT_L14_VISION


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # one seed for parameter init, data order and noise
    config.dry_run = False  # True: build abstract models, print sizes, train nothing

    config.model = ml_collections.ConfigDict()
    # Frozen CLIP towers (SPEC.md §1); fields of catflax.models.clip.CLIP{Text,Vision}Config.
    config.model.clip_text = dataclasses.asdict(CLIP_VIT_L14_TEXT)
    config.model.clip_vision = dataclasses.asdict(CLIP_VIT_L14_VISION)

    config.weights = ml_collections.ConfigDict()
    config.weights.clip = ""  # transformers CLIP directory ("" = random init, e.g. the demo)
    config.weights.tokenizer = ""  # tokenizer directory ("" = built offline from openai-clip)
    return config
