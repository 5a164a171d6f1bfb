"""Export of a training run: catflax, reference (official CAT layout) and diffusers formats,
round trips through our loaders and through diffusers' / transformers' own PyTorch classes.

The run directory is built as the training loop leaves it (stage finals saved with the loop's
`save_final`, the last 2b checkpoint with EMA through the loop's Checkpointer, WORKDIR/config.json)
from the demo config with pretrained CLIP / SD weights saved here by transformers and diffusers:
running the four stages would take minutes of compilation on 2 CPU cores.
"""

import dataclasses
import json
import os
import shutil

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from catflax import export
from catflax.models.clip import CLIPTextModel, CLIPVisionModel
from catflax.models.inpainter import SemanticInpainter
from catflax.models.unet import UNet, is_adapter_param
from catflax.models.vae import AutoencoderKL
from catflax.pipeline import CATPipeline
from catflax.train import loop, optim
from catflax.train.checkpoint import Checkpointer
from catflax.train.steps import create_state
from catflax.weights import convert, diffusers_export, io, ldm, pipeline_format

STEPS = 2  # per stage, as in the saved config
TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
            eos_token_id=49407, bos_token_id=49406, pad_token_id=49407)  # fmt: skip
VISION = dict(image_size=64, patch_size=4, hidden_size=32, intermediate_size=64,
              num_hidden_layers=1, num_attention_heads=2, hidden_act="quick_gelu")  # fmt: skip
UNET = dict(sample_size=8, in_channels=9, out_channels=4, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
            attention_head_dim=2, norm_num_groups=8, cross_attention_dim=32)  # fmt: skip
VAE = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
           down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4)  # fmt: skip


def perturb(model: torch.nn.Module) -> None:
    """Norm weights start at 1 and biases at 0 in PyTorch; randomise them so mix-ups show."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))


def flat(state) -> dict[str, np.ndarray]:
    return {convert.path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def assert_same(a, b, dtype=None):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        want = fb[k] if dtype is None else fb[k].astype(dtype)
        assert fa[k].dtype == want.dtype, k
        np.testing.assert_array_equal(fa[k], want, err_msg=k)


def nested(**parts) -> nnx.State:
    """One State holding each part under its name, as nnx.split makes a stage's parameters."""
    return nnx.from_flat_state(
        [((name, *path), v) for name, part in parts.items() for path, v in nnx.to_flat_state(part)]
    )


def bumped(state, seed: int):
    """`state` plus small noise: a stand-in for a stage's trained parameters (on one device:
    orbax slices arrays replicated over 8 fake devices thousands of times when saving)."""
    rng = np.random.default_rng(seed)
    noisy = lambda x: np.asarray(x) + rng.normal(0, 0.02, x.shape).astype(x.dtype)  # noqa: E731
    return jax.tree.map(lambda x: jax.device_put(noisy(x), jax.devices()[0]), state)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished four-stage run directory; returns (workdir, config, expected part states)."""
    from configs import demo

    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    clip = transformers.CLIPModel(
        transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)
    )
    clip.save_pretrained(root / "clip")
    unet, vae = diffusers.UNet2DConditionModel(**UNET), diffusers.AutoencoderKL(**VAE)
    perturb(unet), perturb(vae)
    unet.save_pretrained(root / "sd" / "unet")
    vae.save_pretrained(root / "sd" / "vae")

    config = demo.get_config()
    for part in ("clip_text", "clip_vision", "inpainter"):
        config.model[part].num_layers = 1
    config.weights.clip, config.weights.sd = str(root / "clip"), str(root / "sd")
    config.weights.pooling_vae = False  # the VAE from the SD directory, with its sizes
    config.model.vae.block_out_channels = VAE["block_out_channels"]
    config.model.vae.norm_num_groups = VAE["norm_num_groups"]
    config.train.ema_decay = 0.9
    for stage in ("1a", "1b", "2a", "2b"):
        config[f"stage_{stage}"].steps = STEPS
    workdir = str(root / "workdir")
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))

    _, params, shardings = export._abstract_params(config, export.export_mesh())
    loop.load_pretrained(config, params, shardings)
    inpainter = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), params["inpainter"])
    parts = {
        "I1": bumped(inpainter, 1), "U1": bumped(params["unet"], 2), "I2": bumped(inpainter, 3),
        "I3": bumped(inpainter, 4), "U3": bumped(params["unet"], 5),
        "E_I3": bumped(inpainter, 6), "E_U3": bumped(params["unet"], 7),
        "clip_text": params["clip_text"], "vae": params["vae"],
    }  # fmt: skip
    finals = {"1a": {"inpainter": "I1"}, "1b": {"unet": "U1"}, "2a": {"inpainter": "I2"},
              "2b": {"inpainter": "I3", "unet": "U3"}}  # fmt: skip
    for stage, trained in finals.items():
        loop.save_final(workdir, stage, nested(**{p: parts[k] for p, k in trained.items()}))
    # The last 2b checkpoint, as the loop writes it: train state (with EMA), config.
    trainable = nested(inpainter=parts["I3"], unet=parts["U3"])
    tx = optim.make_optimizer(optim.OptimizerConfig(), trainable)
    state = create_state(trainable, tx, jax.random.key(0), ema=True)
    state = state.replace(ema=nested(inpainter=parts["E_I3"], unet=parts["E_U3"]),
                          step=jnp.asarray(STEPS, jnp.int32))  # fmt: skip
    ckpt = Checkpointer(os.path.join(workdir, "2b", "checkpoints"))
    ckpt.save(STEPS, state, None, config)
    ckpt.wait()
    ckpt.close()
    return workdir, config, parts, root


@pytest.fixture(scope="module")
def final(run):
    """The run's model as exported by default: stage 2b, raw parameters; and the notes."""
    model, _, notes = export.load_run(run[0])
    return model, notes


def test_stage_models_take_each_part_from_the_right_stage(run, final):
    workdir, _, parts, root = run
    model, notes = final
    assert notes[-2:] == ["inpainter from stage 2b", "unet from stage 2b"]
    assert_same(nnx.state(model.inpainter), parts["I3"])
    assert_same(nnx.state(model.unet), parts["U3"])
    earlier, _, notes = export.load_run(workdir, "2a")  # the UNet is 1b's (2a froze it)
    assert notes[-2:] == ["inpainter from stage 2a", "unet from stage 1b"]
    assert_same(nnx.state(earlier.inpainter), parts["I2"])
    assert_same(nnx.state(earlier.unet), parts["U1"])
    assert export.finished_stages(workdir) == ["1a", "1b", "2a", "2b"]
    # Frozen parts: the pretrained weights the run's config names.
    assert_same(
        nnx.state(model.clip_text), nnx.state(CLIPTextModel.from_pretrained(str(root / "clip")))
    )
    assert_same(nnx.state(model.vae), nnx.state(AutoencoderKL.from_pretrained(str(root / "sd"))))
    # --ema: the stage's own parts from the EMA saved in its last checkpoint.
    ema_model, _, notes = export.load_run(workdir, "2b", ema=True)
    assert_same(nnx.state(ema_model.inpainter), parts["E_I3"])
    assert_same(nnx.state(ema_model.unet), parts["E_U3"])
    assert "inpainter from stage 2b (EMA)" in notes


def writer_args(config, dtype="float32"):
    from catflax.tokenizer import load_tokenizer

    return dict(tokenizer=load_tokenizer(), resolution=config.data.resolution,
                sampling=dict(config.sampling), dtype=dtype)  # fmt: skip


def test_catflax_export_round_trip_is_bit_identical(run, final, tmp_path):
    _, config, _, _ = run
    model = final[0]
    export.write_catflax(model, str(tmp_path / "fp32"), **writer_args(config))
    pipe = CATPipeline.from_pretrained(str(tmp_path / "fp32"))
    assert_same(nnx.state(pipe.model), nnx.state(model))
    assert pipe.resolution == config.data.resolution
    assert dataclasses.asdict(pipe.sampling) == dict(config.sampling)
    # bf16: parameters stored and loaded in bfloat16, equal to the fp32 ones rounded.
    export.write_catflax(model, str(tmp_path / "bf16"), **writer_args(config, "bfloat16"))
    half = CATPipeline.from_pretrained(str(tmp_path / "bf16"))
    assert half.model.config.unet.param_dtype == "bfloat16"
    assert_same(nnx.state(half.model), nnx.state(model), dtype=jnp.bfloat16)


@jax.jit
def _eps(graphdef, state, batch):
    """One UNet noise prediction with the inpainter's tokens: every trained part at work."""
    model = nnx.merge(graphdef, state)
    context, label = model.encode_text(batch["input_ids"])
    tokens = model.semantic_tokens("inpainter", batch, label)
    latents = model.encode_latents(batch["masked512"], jax.random.key(0))
    return model.predict_noise(latents, batch["t"], batch["mask64"], latents, context, tokens)


def test_reference_export_loads_with_the_official_layout_loader(run, final, tmp_path):
    workdir = run[0]
    model = final[0]
    assert export.main([f"--workdir={workdir}", f"--out={tmp_path}", "--format=reference"]) == 0
    path = str(tmp_path / export.REFERENCE_FILE)
    state = io.read_safetensors(path)
    parts = ldm.split_checkpoint(state)
    assert sorted(parts["other"]) == sorted(ldm.ddpm_buffers())  # nothing but DDPM buffers
    assert any(".attn3.to_k." in k for k in parts["unet"]) and any(
        ".norm4." in k for k in parts["unet"]
    )
    assert not any("ref_attn" in k or "ref_norm" in k for k in state)
    assert "text_model.embeddings.token_embedding.weight" in parts["clip_text"]
    assert "vision_model.pre_layrnorm.weight" in parts["clip_vision"]
    assert "encoder.layers.0.self_attn.q_proj.weight" in parts["fusion_model"]
    ddpm = diffusers.DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    for name, want in (("betas", ddpm.betas), ("alphas_cumprod", ddpm.alphas_cumprod)):
        np.testing.assert_allclose(state[name], want.numpy(), rtol=1e-6, err_msg=name)

    loaded = CATPipeline.from_pretrained(path, config=model.config, resolution=64)
    assert_same(nnx.state(loaded.model), nnx.state(model))
    rng = np.random.default_rng(0)
    batch = dict(
        input_ids=rng.integers(0, 49407, (2, 77)).astype(np.int32),
        masked224=rng.integers(0, 256, (2, 64, 64, 3)).astype(np.uint8),
        mask16=rng.integers(0, 2, (2, 16, 16)).astype(np.int32),
        masked512=rng.uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32),
        mask64=rng.integers(0, 2, (2, 8, 8, 1)).astype(np.float32), t=np.array([10, 900]),
    )  # fmt: skip
    on_one_device = lambda m: (nnx.graphdef(m), jax.device_put(nnx.state(m), jax.devices()[0]))  # noqa: E731
    ours = _eps(*on_one_device(model), batch)  # one placement: one compilation for both
    theirs = _eps(*on_one_device(loaded.model), batch)
    assert float(jnp.abs(ours).mean()) > 0
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_a_clip_folder_must_fit_the_config(run):
    """weights.clip with other sizes than config.model.clip_* (a 336 px CLIP under a 224 px
    config ran silently; other layer counts failed without a name): an error naming both."""
    from catflax.models.cat import ConfigError

    _, config, _, _ = run
    wrong = config.copy_and_resolve_references()
    wrong.model.clip_text.num_layers = 2
    _, params, shardings = export._abstract_params(wrong, export.export_mesh())
    with pytest.raises(
        ConfigError,
        match=r"clip/config.json: this CLIP does not fit config\.model"
        r"\.clip_text \(num_layers: 2 in config.model.clip_text, 1 in the file\)",
    ):
        loop.load_pretrained(wrong, params, shardings)


def test_an_official_checkpoint_loads_as_weights_cat_for_fine_tuning(run, final, tmp_path):
    """config.weights.cat (the reference-format export stands in for the official file) gives
    every part; a file that is not a CAT-Diffusion checkpoint is refused before any part loads."""
    workdir, config, _, _ = run
    model = final[0]
    assert export.main([f"--workdir={workdir}", f"--out={tmp_path}", "--format=reference"]) == 0
    path = str(tmp_path / export.REFERENCE_FILE)
    tuned = config.copy_and_resolve_references()
    tuned.weights.cat, tuned.weights.clip, tuned.weights.sd = path, "", ""
    _, params, shardings = export._abstract_params(tuned, export.export_mesh())
    notes = loop.load_pretrained(tuned, params, shardings)
    assert notes == [f"every part from the CAT-Diffusion checkpoint {path}"]
    assert_same(params, nnx.state(model, nnx.Param))
    # weights.sd as well (configs/coco.py sets it): the checkpoint's UNet and VAE stay, not SD's
    # with a fresh adapter; sd is not even read.
    tuned.weights.sd = str(tmp_path / "no-such-sd")
    _, params, shardings = export._abstract_params(tuned, export.export_mesh())
    notes = loop.load_pretrained(tuned, params, shardings)
    assert notes[1] == f"weights.sd={tuned.weights.sd} not used: weights.cat gives the UNet and VAE"
    assert_same(params, nnx.state(model, nnx.Param))
    tuned.weights.sd = ""

    state = io.read_safetensors(path)
    sd_only = {k: v for k, v in state.items() if not k.startswith("fusion_model.")}
    io.write_safetensors(str(tmp_path / "sd.safetensors"), sd_only)
    tuned.weights.cat = str(tmp_path / "sd.safetensors")
    _, params, shardings = export._abstract_params(tuned, export.export_mesh())
    with pytest.raises(io.WeightFileError, match=r"sd\.safetensors: not a CAT-Diffusion"):
        loop.load_pretrained(tuned, params, shardings)


def test_diffusers_export_loads_in_diffusers_and_transformers(run, final, tmp_path):
    _, config, _, _ = run
    model, out = final[0], str(tmp_path)
    export.write_diffusers(model, out, **writer_args(config))
    for name in ("unet", "vae", "text_encoder", "image_encoder", "tokenizer", "scheduler"):
        assert os.path.isdir(os.path.join(out, name)), name

    # UNet: diffusers' own class, no adapter; equals ours with ref_adapter=False within 1e-4.
    torch_unet, info = diffusers.UNet2DConditionModel.from_pretrained(
        os.path.join(out, "unet"), output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    plain = UNet.from_pretrained(out, ref_adapter=False)
    want = {k: v for k, v in flat(nnx.state(model.unet)).items() if not is_adapter_param(k)}
    got = flat(nnx.state(plain))
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 9)).astype(np.float32)
    t, context = np.array([3, 981]), rng.standard_normal((2, 7, 32)).astype(np.float32)
    with torch.no_grad():
        x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2))
        ref = torch_unet(x_torch, torch.from_numpy(t), torch.from_numpy(context)).sample
    ref = ref.numpy().transpose(0, 2, 3, 1)
    ours = np.asarray(nnx.jit(lambda m, *a: m(*a))(plain, x, t, context))
    err = float(np.abs(ours - ref).max())
    print(f"diffusers UNet (adapter off) vs ours: max abs error {err:.2e}")
    assert err < 1e-4 and np.abs(ref).mean() > 1e-2
    # ... and with the adapter file beside it, our loader gives back every UNet parameter, in
    # the stored dtype.
    assert_same(nnx.state(diffusers_export.load_unet_with_adapter(out)), nnx.state(model.unet))
    half = str(tmp_path / "bf16")
    export.write_diffusers(model, half, **writer_args(config, "bfloat16"))
    assert_same(
        nnx.state(diffusers_export.load_unet_with_adapter(half)),
        nnx.state(model.unet),
        dtype=jnp.bfloat16,
    )

    # Text encoder: transformers' CLIPTextModel; same output as ours.
    text, info = transformers.CLIPTextModel.from_pretrained(
        os.path.join(out, "text_encoder"), output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = np.asarray(rng.integers(0, 49406, (2, 77)))
    ids[:, 5] = 49407  # EOS: the pooled position
    with torch.no_grad():
        ref = text(torch.from_numpy(ids))
    last, pooled = model.clip_text(jnp.asarray(ids, jnp.int32))
    np.testing.assert_allclose(last, ref.last_hidden_state.numpy(), atol=1e-4)
    np.testing.assert_allclose(pooled, ref.pooler_output.numpy(), atol=1e-4)
    # The rest loads in its library with nothing missing.
    _, info = transformers.CLIPVisionModel.from_pretrained(
        os.path.join(out, "image_encoder"), output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    _, info = diffusers.AutoencoderKL.from_pretrained(
        os.path.join(out, "vae"), output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert_same(nnx.state(AutoencoderKL.from_pretrained(out)), nnx.state(model.vae))
    assert_same(nnx.state(CLIPVisionModel.from_pretrained(os.path.join(out, "image_encoder"))),
                nnx.state(model.clip_vision))  # fmt: skip
    scheduler = diffusers.DDIMScheduler.from_pretrained(os.path.join(out, "scheduler"))
    scheduler.set_timesteps(50)
    from catflax.diffusion import ddim_timesteps

    np.testing.assert_array_equal(scheduler.timesteps.numpy(), ddim_timesteps(50))
    inpainter = SemanticInpainter.from_state_dict(
        io.read_safetensors(os.path.join(out, diffusers_export.INPAINTER_FILE)),
        model.config.inpainter, prefix="",
    )  # fmt: skip
    assert_same(nnx.state(inpainter), nnx.state(model.inpainter))
    with open(os.path.join(out, diffusers_export.CONFIG_FILE)) as f:
        assert json.load(f)["model"]["unet"]["ref_dim"] == model.config.unet.ref_dim


def test_export_errors_are_clear(run, tmp_path, capsys):
    workdir, config, _, _ = run
    assert export.main([f"--workdir={workdir}", f"--out={tmp_path}", "--format=onnx"]) == 1
    assert "--format='onnx'" in capsys.readouterr().err
    assert export.main([f"--workdir={workdir}"]) == 1
    assert "missing --out" in capsys.readouterr().err
    # A stage that has not finished, and --ema for a run without EMA.
    partial = tmp_path / "partial"
    shutil.copytree(os.path.join(workdir, "1a", "final"), partial / "1a" / "final")
    no_ema = config.copy_and_resolve_references()
    no_ema.train.ema_decay = 0.0
    (partial / "config.json").write_text(no_ema.to_json_best_effort())
    with pytest.raises(
        export.ExportError, match=r"stage 2b is not finished.*finished stages: \['1a'\]"
    ):
        export.load_run(str(partial), "2b")
    with pytest.raises(export.ExportError, match="trained without EMA"):
        export.load_run(str(partial), "1a", ema=True)
    with pytest.raises(export.ExportError, match="no run config"):
        shutil.copytree(partial / "1a" / "final", tmp_path / "empty" / "1a" / "final")
        export.load_run(str(tmp_path / "empty"))


def test_report_of_a_run_on_an_object_store(run, fake_gcs, monkeypatch, capsys, tmp_path):
    """The end-of-run report with a gs:// workdir (the README's TPU smoke test on one host): loss
    curves read from the bucket, the export and report.json written locally and copied there."""
    from catflax import report

    workdir, config, _, _ = run
    data_dir = tmp_path / "data"  # synthetic_shapes/tiny, generated for the colour check
    shutil.copytree(workdir, fake_gcs / "bucket" / "run")
    for stage in ("1a", "1b", "2a", "2b"):
        rows = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 11)]
        (fake_gcs / "bucket" / "run" / stage / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    # Orbax reads gs:// through TensorStore's own driver, which the fake cannot stand in for.
    load_run = export.load_run
    monkeypatch.setattr(export, "load_run", lambda _, mesh=None: load_run(workdir, mesh=mesh))
    config = config.copy_and_resolve_references()
    config.data.eval_mixture, config.data.data_dir = "synthetic_shapes/tiny", str(data_dir)
    config.report.num_images = config.report.grid_rows = 2
    config.sampling.num_steps = 2
    summary = report.run(config, "gs://bucket/run", mesh=None)
    assert summary["export"] == "gs://bucket/run/export"
    assert summary["example"]["image"] == "gs://bucket/run/example/image.png"
    assert all(curve["fell"] for curve in summary["losses"].values())
    on_store = fake_gcs / "bucket" / "run"
    assert json.loads((on_store / "report.json").read_text()) == json.loads(json.dumps(summary))
    assert (on_store / "samples.png").is_file() and (on_store / "example" / "mask.png").is_file()
    pipe = CATPipeline.from_pretrained(str(on_store / "export"))
    assert pipe.resolution == config.data.resolution
    # The printed command names local copies (catflax.inpaint reads local files).
    out = capsys.readouterr().out
    copy = "copy them here: gcloud storage cp -r gs://bucket/run/export gs://bucket/run/example ."
    assert copy in out
    assert "try it: python -m catflax.inpaint --weights=export --image=example/image.png" in out


def test_an_out_that_is_a_training_workdir_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    def load_stage(*args, **kwargs):
        raise AssertionError("the run was loaded before --out was checked")

    monkeypatch.setattr(export, "load_stage", load_stage)
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"seed": 0}')  # a training run's config
    (tmp_path / "file").write_text("x")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    mixed = tmp_path / "mixed"  # an earlier export with the user's own file in it
    mixed.mkdir()
    (mixed / "config.json").write_text('{"format": "catflax-pipeline"}')
    (mixed / "unet.safetensors.tmp").write_text("x")  # what an interrupted write left: replaced
    (mixed / "notes.txt").write_text("mine")
    for out, fmt, message in (
        (workdir, "catflax", f"--out={workdir}: {workdir / 'config.json'} exists and is not a "
         "catflax pipeline config"),
        (broken, "catflax", "exists and is not a catflax pipeline config"),
        (tmp_path / "file", "diffusers", f"--out={tmp_path / 'file'}: exists and is not a "
         "directory"),
        (tmp_path / "file", "reference", "exists and is not a directory"),
        (workdir, "diffusers", f"--out={workdir}: not empty and not a diffusers export (no "
         "cat_config.json)"),
        (mixed, "catflax", f"--out={mixed}: holds ['notes.txt'] beside the catflax export"),
        (workdir / "x.safetensors", "reference", "x.safetensors is a directory"),
        ("gs://bucket/export", "catflax", "export writes local files"),
    ):  # fmt: skip
        if str(out).endswith("x.safetensors"):
            out.mkdir(exist_ok=True)
        argv = [f"--workdir={workdir}", f"--out={out}", f"--format={fmt}"]
        assert export.main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("export: ") and message in err, err
        assert err.count("\n") == 1 and "Traceback" not in err  # one line
    assert json.loads((workdir / "config.json").read_text()) == {"seed": 0}
    assert (mixed / "notes.txt").read_text() == "mine"
    # The reference file replaces only itself: it may go into any folder, or be named (the
    # next check is the run's: this one has no finished stage).
    for out in (workdir, tmp_path / "file.safetensors"):
        with pytest.raises(export.ExportError, match="no finished stage"):
            export.export_run(str(workdir), str(out), fmt="reference")
    (mixed / "notes.txt").unlink()
    for out, fmt in ((mixed, "catflax"), (tmp_path / "new", "diffusers"), (broken, "reference")):
        export.check_out(str(out), fmt)  # accepted


def test_a_bad_tokenizer_is_refused_before_the_weights_load(tmp_path, monkeypatch, capsys):
    def load_stage(*args, **kwargs):
        raise AssertionError("the weights were loaded before the tokenizer")

    monkeypatch.setattr(export, "load_stage", load_stage)
    workdir, tokenizer = tmp_path / "run", tmp_path / "tokenizer"
    (workdir / "1a" / "final" / "params").mkdir(parents=True)  # a finished stage
    tokenizer.mkdir()  # empty
    (workdir / "config.json").write_text(json.dumps({"weights": {"tokenizer": str(tokenizer)}}))
    for fmt in ("catflax", "diffusers"):
        argv = [f"--workdir={workdir}", f"--out={tmp_path / 'out'}", f"--format={fmt}"]
        assert export.main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("export: the run's tokenizer (config.weights.tokenizer) failed: "
                              f"{tokenizer}: no CLIP tokenizer files"), err  # fmt: skip
        assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_an_export_replaces_an_earlier_one_only_once_complete(run, final, tmp_path, monkeypatch):
    """Over an earlier export, a write that fails midway leaves it byte for byte as it was and
    nothing beside it (no staging folder or file); a complete export replaces it."""
    workdir, config, _, _ = run
    monkeypatch.setattr(export, "load_run", lambda *args, **kwargs: (final[0], config, []))
    write_safetensors = io.write_safetensors

    def failing_at(n: int):
        calls = []

        def write(path, tensors, metadata=None):
            calls.append(path)
            if len(calls) == n:
                with open(path, "wb") as f:
                    f.write(b"half a file")
                raise OSError("disk full")
            write_safetensors(path, tensors, metadata)

        return write

    def files(root) -> dict[str, bytes]:
        if root.is_file():
            return {root.name: root.read_bytes()}
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    for fmt, out, entries in (
        ("catflax", tmp_path / "a" / "out", pipeline_format.ENTRIES),
        ("diffusers", tmp_path / "b" / "out", diffusers_export.ENTRIES),
        ("reference", tmp_path / "c" / "out.safetensors", ()),
    ):
        export.export_run(workdir, str(out), fmt=fmt, report=lambda _: None)
        if entries:  # every entry the format lists, and nothing else
            assert sorted(os.listdir(out)) == sorted(entries), fmt
            (out / "inpainter.safetensors.tmp").write_bytes(b"debris")  # goes with the folder
        before, inode = files(out), out.stat().st_ino
        monkeypatch.setattr(io, "write_safetensors", failing_at(1 if fmt == "reference" else 3))
        with pytest.raises(OSError, match="disk full"):
            export.export_run(workdir, str(out), fmt=fmt, report=lambda _: None)
        monkeypatch.setattr(io, "write_safetensors", write_safetensors)
        assert files(out) == before and out.stat().st_ino == inode, fmt
        assert os.listdir(out.parent) == [out.name], fmt  # no staging folder or file
        export.export_run(workdir, str(out), fmt=fmt, report=lambda _: None)
        assert os.listdir(out.parent) == [out.name], fmt
        assert out.stat().st_ino != inode, fmt
        if entries:
            assert sorted(os.listdir(out)) == sorted(entries), fmt
