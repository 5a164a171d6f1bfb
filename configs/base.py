"""Shared defaults for every catflax run; variants override what differs.

Run: python -m catflax.main --config=configs/base.py --workdir=/tmp/catflax
"""

import dataclasses

import ml_collections

from catflax.models.clip import CLIP_VIT_L14_TEXT, CLIP_VIT_L14_VISION
from catflax.models.inpainter import InpainterConfig
from catflax.sharding import DEFAULT_RULES


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # one seed for parameter init, data order and noise
    config.dry_run = False  # True: build abstract models, print sizes, train nothing

    config.model = ml_collections.ConfigDict()
    # Frozen CLIP towers (SPEC.md §1); fields of catflax.models.clip.CLIP{Text,Vision}Config.
    config.model.clip_text = dataclasses.asdict(CLIP_VIT_L14_TEXT)
    config.model.clip_vision = dataclasses.asdict(CLIP_VIT_L14_VISION)
    # Semantic inpainter (SPEC.md §3); fields of catflax.models.inpainter.InpainterConfig.
    # hidden_size must equal clip_vision.hidden_size, label_size clip_text.hidden_size.
    config.model.inpainter = dataclasses.asdict(InpainterConfig())

    config.sampling = ml_collections.ConfigDict()  # DDIM (SPEC.md §6)
    config.sampling.num_steps = 50  # DDIM steps (timesteps k*(1000//steps)+1)
    config.sampling.guidance_scale = 7.5  # classifier-free guidance; 1.0 = conditional only
    config.sampling.eta = 0.0  # 0 = deterministic DDIM; > 0 adds per-step noise

    config.weights = ml_collections.ConfigDict()
    config.weights.clip = ""  # transformers CLIP directory ("" = random init, e.g. the demo)
    config.weights.tokenizer = ""  # tokenizer directory ("" = built offline from openai-clip)
    # ------------------------------------------------------------------ training (SPEC.md §5)
    config.stages = ("1a", "1b", "2a", "2b")  # run in this order; a finished stage is skipped
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1 fills
    # Logical parameter axis -> mesh axis (see catflax/sharding.py); None replicates.
    config.sharding_rules = ml_collections.ConfigDict(dict(DEFAULT_RULES))
    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.weight_decay = 1e-2  # AdamW, torch's default as in the reference
    config.optimizer.grad_clip_norm = 1.0  # global-norm clipping; 0 disables
    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 128  # global batch (reference: 16 per GPU x 8 GPUs)
    config.train.cond_dropout = 0.1  # p of dropping prompt and tokens for the whole batch
    config.train.ema_decay = 0.0  # EMA of trained parameters; 0 = off
    config.train.export_ema = False  # hand the EMA (not the raw parameters) to the next stage
    config.train.log_every = 50  # steps between metric lines / TensorBoard points
    config.train.checkpoint_every = 1000  # steps between checkpoints (and at stage end)
    config.train.keep_checkpoints = 2  # checkpoints kept per stage
    config.train.sample_every = 0  # steps between sample grids in TensorBoard; 0 = stage end only
    config.train.peak_flops_per_device = 989e12  # for MFU: H100 SXM bf16 dense; v5p 459e12
    for name, lr_fast, lr_slow in (("1a", 1e-4, 0.0), ("1b", 1e-4, 1e-5),
                                   ("2a", 1e-4, 0.0), ("2b", 1e-4, 1e-5)):  # fmt: skip
        stage = ml_collections.ConfigDict()
        stage.steps = 20000  # optimiser steps of this stage
        stage.lr_fast = lr_fast  # inpainter and reference adapter
        stage.lr_slow = lr_slow  # the rest of the UNet (unused where the UNet is frozen)
        stage.warmup_steps = 0  # linear warmup
        if name == "1a":
            stage.masked_numerator = False  # True: the paper's loss on masked patches only
        config[f"stage_{name}"] = stage
    return config
