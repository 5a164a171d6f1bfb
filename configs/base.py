"""Shared defaults for every catflax run; variants override what differs.

Run: python -m catflax.main --config=configs/base.py --workdir=/tmp/catflax
"""

import dataclasses

import ml_collections

from catflax.models.clip import CLIP_VIT_L14_TEXT, CLIP_VIT_L14_VISION
from catflax.models.inpainter import InpainterConfig
from catflax.models.unet import CAT_UNET
from catflax.models.vae import SD15_VAE
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
    # SD-1.5-inpainting UNet + reference adapter (SPEC.md §1-2); fields of
    # catflax.models.unet.UNetConfig. ref_dim must equal clip_vision.hidden_size,
    # cross_attention_dim clip_text.hidden_size.
    config.model.unet = dataclasses.asdict(CAT_UNET)
    # SD-1.5 AutoencoderKL (f=8); fields of catflax.models.vae.VAEConfig.
    config.model.vae = dataclasses.asdict(SD15_VAE)

    config.sampling = ml_collections.ConfigDict()  # DDIM (SPEC.md §6)
    config.sampling.num_steps = 50  # DDIM steps (timesteps k*(1000//steps)+1)
    config.sampling.guidance_scale = 7.5  # classifier-free guidance; 1.0 = conditional only
    config.sampling.eta = 0.0  # 0 = deterministic DDIM; > 0 adds per-step noise

    config.weights = ml_collections.ConfigDict()
    config.weights.clip = ""  # transformers CLIP directory ("" = random init, e.g. the demo)
    config.weights.tokenizer = ""  # tokenizer directory ("" = built offline from openai-clip)
    # SD-1.5-inpainting: a diffusers pipeline directory (unet/, vae/) or an LDM single file
    # (.safetensors; "" = random init). The adapter is not in it and starts fresh.
    config.weights.sd = ""
    # An official CAT-Diffusion checkpoint (every part; e.g. to fine-tune it); "" = none.
    config.weights.cat = ""
    # True: the VAE is a fixed f x f block average / copy (catflax/weights/pooling_vae.py), for
    # runs without pretrained weights (the demo): a random frozen VAE cannot decode colours.
    config.weights.pooling_vae = False
    config.weights.allow_pickle = False  # True: .ckpt/.bin pickles may load (torch needed)
    # True: the frozen CLIP towers / VAE may stay at random initialisation (the demo, tests);
    # False: training refuses to start without weights for them.
    config.weights.random_frozen = False
    # ------------------------------------------------------------------ data (SPEC.md §4)
    # Built with `python -m catflax.data.prepare`; read by catflax.data.pipeline.from_config.
    # Data order and augmentation are seeded by config.seed; the training batch per process
    # is train.batch_size / process count.
    config.data = ml_collections.ConfigDict()
    config.data.data_dir = "~/tensorflow_datasets"  # TFDS data_dir of prepared data (or gs://)
    # TFDS name[/config]:weight, ... (the reference: 80% OpenImages objects, 20% LAION pairs)
    config.data.train_mixture = "openimages_inpaint:0.8,text_image_pairs:0.2"
    config.data.train_split = "train"
    config.data.eval_mixture = "openimages_inpaint"  # each read once, in order
    config.data.eval_split = "validation"
    config.data.resolution = 512  # VAE image side (image512); latents are resolution / 8
    vision = config.model.clip_vision
    config.data.clip_resolution = vision.get_ref("image_size")  # CLIP image side (image224)
    config.data.patch_grid = vision.get_ref("image_size") // vision.get_ref("patch_size")  # mask16
    config.data.eval_batch_size = 16  # per process
    config.data.num_workers = 8  # grain worker processes per host (0 = in the trainer)
    config.data.prefetch = 2  # batches each worker keeps ready
    config.data.read_threads = 2  # decoding threads inside each worker
    config.data.long_caption_prob = 0.2  # object examples that use their long caption, if any
    config.data.dilate_prob = 0.5  # mask augmentation: dilate 5x5, else the filled box
    config.data.eval_crop = False  # eval: plain resize (reference); True: crop around the mask
    config.data.tokenize = True  # input_ids made in the workers (~0.1 ms an example)
    # ------------------------------------------------------------------ training (SPEC.md §5)
    config.stages = ("1a", "1b", "2a", "2b")  # run in this order; a finished stage is skipped
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1 fills
    # Logical parameter axis -> mesh axes, comma-separated ("fsdp,tensor"); "" replicates
    # (catflax/sharding.py), e.g. --config.sharding_rules.linear_in=fsdp
    config.sharding_rules = ml_collections.ConfigDict(
        {name: ",".join(axes or ()) if not isinstance(axes, str) else axes
         for name, axes in DEFAULT_RULES.items()}
    )  # fmt: skip
    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.weight_decay = 1e-2  # AdamW, torch's default as in the reference
    config.optimizer.grad_clip_norm = 0.0  # global-norm clipping; 0: off, as the reference
    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 128  # global batch (reference: 16 per GPU x 8 GPUs)
    config.train.cond_dropout = 0.1  # p of dropping prompt and tokens for the whole batch
    # Examples per reference GPU (16 to reproduce its 8-GPU run): conditioning dropout drawn and
    # the distillation loss normalised per group of this many; 0: the whole global batch.
    config.train.loss_group_size = 0
    config.train.ema_decay = 0.0  # EMA of trained parameters; 0 = off
    config.train.export_ema = False  # hand the EMA (not the raw parameters) to the next stage
    config.train.log_every = 50  # steps between metric lines / TensorBoard points
    config.train.checkpoint_every = 1000  # steps between checkpoints (and at stage end)
    config.train.keep_checkpoints = 2  # checkpoints kept per stage
    # Resume the data stream where it stopped (needs the same process count and num_workers);
    # False restores only the model and optimiser and restarts the stream.
    config.train.restore_data = True
    config.train.sample_every = 0  # steps between sample grids; 0: stage end only; -1: never
    # For MFU: peak FLOP/s per device; 0 = the known bf16 peak of the device kind (H100 989e12,
    # v5e 197e12, v5p 459e12, ...: catflax.train.metrics.PEAK_BF16_FLOPS), else no MFU.
    config.train.peak_flops_per_device = 0.0
    for name, lr_fast, lr_slow in (("1a", 1e-4, 0.0), ("1b", 1e-4, 1e-5),
                                   ("2a", 1e-4, 0.0), ("2b", 1e-4, 1e-5)):  # fmt: skip
        stage = ml_collections.ConfigDict()
        stage.steps = 20000  # optimiser steps of this stage
        stage.lr_fast = lr_fast  # inpainter and reference adapter
        stage.lr_slow = lr_slow  # the rest of the UNet (unused where the UNet is frozen)
        stage.warmup_steps = 0  # linear warmup
        if name == "1a":
            stage.masked_numerator = False  # True: the paper's loss on masked patches only
            # Reduce-on-plateau on the validation loss (the reference's ran once an epoch, over
            # 2 epochs, so with patience 2 it never fired; plateau_every=0 is that): every
            # plateau_every steps (0: constant rate) the distillation loss over the first
            # plateau_eval_batches batches of data.eval_* (0: all); after more than
            # plateau_patience validations without a relative improvement of plateau_threshold,
            # the learning rates are multiplied by plateau_factor.
            stage.plateau_every = 1000
            stage.plateau_eval_batches = 64
            stage.plateau_factor = 0.1
            stage.plateau_patience = 2
            stage.plateau_threshold = 1e-4
        config[f"stage_{name}"] = stage
    # ------------------------------------------------------------------ end-of-run report
    config.report = ml_collections.ConfigDict()
    config.report.enabled = False  # after the stages: WORKDIR/export, samples.png, report.json
    config.report.num_images = 128  # held-out synthetic_shapes images in the colour check
    config.report.batch_size = 32  # images sampled at once
    config.report.grid_rows = 8  # rows of WORKDIR/samples.png
    return config
