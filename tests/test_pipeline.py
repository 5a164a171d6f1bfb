"""CATPipeline and the inpainting CLI end to end on a tiny random model: the export directory
round trip, the official checkpoint layout, paste-back, seeds, batches and bad input."""

import dataclasses
import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from catflax import CATPipeline, inpaint
from catflax import pipeline as pipeline_lib
from catflax.images import ImageReadError, InpaintWarning, paste_back
from catflax.models.cat import CATDiffusion
from catflax.weights import convert, io, ldm, pipeline_format
from tests.tiny import TINY_CAT

# The tiny model with the real CLIP vocabulary, so prompts go through the real tokenizer.
CFG = dataclasses.replace(
    TINY_CAT,
    clip_text=dataclasses.replace(TINY_CAT.clip_text, vocab_size=49408, eos_token_id=49407),
)
RES = 16  # model resolution: the tiny VAE has f=2, so 8x8 latents
STEPS = 2


def params(model) -> dict:
    return {convert.path_str(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}


def assert_same_params(a, b):
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype, k
        np.testing.assert_array_equal(np.asarray(pa[k]), np.asarray(pb[k]), err_msg=k)


def example(w: int, h: int, seed: int):
    """A smooth random RGB image of w x h and a rectangular white mask in its middle."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255
    return image, mask


@pytest.fixture(scope="module")
def pipe():
    model = CATDiffusion(CFG, rngs=nnx.Rngs(0))
    return CATPipeline.from_model(
        model, resolution=RES, sampling=dict(num_steps=STEPS, guidance_scale=3.0, eta=0.0)
    )


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("export") / "pipeline")
    pipe.save_pretrained(path)
    return path


def test_save_load_round_trip_is_bit_identical(pipe, saved):
    names = sorted(os.listdir(saved))
    expected = [f"{c}.safetensors" for c in pipeline_format.COMPONENTS]
    assert names == sorted(["config.json", "tokenizer", *expected])
    with open(os.path.join(saved, "config.json")) as f:
        meta = json.load(f)
    assert meta["format"] == "catflax-pipeline" and meta["format_version"] == 1
    assert (meta["resolution"], meta["clip_resolution"]) == (RES, CFG.clip_vision.image_size)
    assert meta["sampling"] == {"num_steps": STEPS, "guidance_scale": 3.0, "eta": 0.0}
    # The export files carry PyTorch names: transformers' CLIPModel spelling, the reference's
    # fusion_model names without their prefix, diffusers' UNet names with the adapter.
    vision = io.read_safetensors(os.path.join(saved, "clip_vision.safetensors"))
    assert "vision_model.pre_layrnorm.weight" in vision
    assert "embeddings.mask_embedding.weight" in io.read_safetensors(
        os.path.join(saved, "inpainter.safetensors")
    )
    unet = io.read_safetensors(os.path.join(saved, "unet.safetensors"))
    assert "down_blocks.0.attentions.0.transformer_blocks.0.ref_attn.to_k.weight" in unet

    loaded = CATPipeline.from_pretrained(saved)
    assert loaded.model.config == pipe.model.config
    assert (loaded.resolution, loaded.sampling) == (pipe.resolution, pipe.sampling)
    assert_same_params(loaded.model, pipe.model)
    prompt = "a Red ball, on the grass!"
    np.testing.assert_array_equal(loaded._tokenize([prompt]), pipe._tokenize([prompt]))


def test_cli_writes_input_size_and_pastes_back(saved, tmp_path):
    image, mask = example(37, 29, seed=1)  # odd, non-square
    rgba = np.concatenate([image, np.full((29, 37, 1), 200, np.uint8)], -1)
    Image.fromarray(rgba).save(tmp_path / "in.png")  # RGBA: converted to RGB
    Image.fromarray(mask).save(tmp_path / "mask.png")
    messages = []
    opts = inpaint.parse([
        f"--weights={saved}", f"--image={tmp_path / 'in.png'}", f"--mask={tmp_path / 'mask.png'}",
        "--prompt=a red ball", f"--out={tmp_path / 'out' / 'out.png'}", f"--num_steps={STEPS}",
    ])  # fmt: skip
    assert inpaint.run(opts, report=messages.append) == [str(tmp_path / "out" / "out.png")]
    out = Image.open(tmp_path / "out" / "out.png")
    assert (out.size, out.mode) == ((37, 29), "RGB")
    out = np.asarray(out)
    outside, inside = mask == 0, mask == 255
    np.testing.assert_array_equal(out[outside], image[outside])
    assert (out[inside] != image[inside]).any(axis=-1).mean() > 0.5
    assert messages == [f"wrote {tmp_path / 'out' / 'out.png'} (37x29)"]


def test_paste_back_off_returns_the_whole_generated_image(pipe):
    image, mask = example(37, 29, seed=1)
    out = np.asarray(pipe(image, mask, "a red ball", num_steps=STEPS, paste_back=False))
    assert out.shape == image.shape
    assert (out[mask == 0] != image[mask == 0]).any()  # the VAE's reconstruction, not the input


def test_same_seed_same_image_different_seed_differs(pipe):
    image, mask = example(37, 29, seed=2)
    a = np.asarray(pipe(image, mask, "a cat", num_steps=STEPS, seed=0))
    b = np.asarray(pipe(image, mask, "a cat", num_steps=STEPS, seed=0))
    c = np.asarray(pipe(image, mask, "a cat", num_steps=STEPS, seed=1))
    np.testing.assert_array_equal(a, b)
    assert (a[mask == 255] != c[mask == 255]).any(axis=-1).mean() > 0.5
    np.testing.assert_array_equal(a[mask == 0], c[mask == 0])


def test_batch_equals_single_calls_and_compiles_once(pipe):
    (a, ma), (b, mb) = example(37, 29, seed=3), example(24, 40, seed=4)
    singles = [
        pipe(a, ma, "a red ball", num_steps=STEPS, seed=5),
        pipe(b, mb, "a green vase", num_steps=STEPS, seed=6),
    ]
    pil_b, pil_mb = Image.fromarray(b), Image.fromarray(mb)  # PIL images work as arrays do
    batch = pipe([a, pil_b], [ma, pil_mb], ["a red ball", "a green vase"], num_steps=STEPS, seed=5)
    assert isinstance(batch, list) and len(batch) == 2
    for one, many in zip(singles, batch):  # per-example seeds: the batch changes nothing
        np.testing.assert_array_equal(np.asarray(many), np.asarray(one))
    compiled = pipeline_lib._generate._cache_size()
    pipe([b, a], [mb, ma], ["x", "y"], num_steps=STEPS, seed=[9, 1], guidance_scale=5.0)
    pipe(a, ma, "another prompt", num_steps=STEPS, seed=3, guidance_scale=2.0)
    assert pipeline_lib._generate._cache_size() == compiled  # same (batch, steps): no compile
    # eta > 0: DDIM's per-step noise is per example too.
    kw = dict(num_steps=STEPS, eta=0.8)
    singles = [pipe(a, ma, "a red ball", seed=5, **kw), pipe(b, mb, "a green vase", seed=6, **kw)]
    batch = pipe([a, b], [ma, mb], ["a red ball", "a green vase"], seed=5, **kw)
    for one, many in zip(singles, batch):
        np.testing.assert_array_equal(np.asarray(many), np.asarray(one))
    assert (np.asarray(singles[0]) != np.asarray(pipe(a, ma, "a red ball", seed=5))).any()
    compiled = pipeline_lib._generate._cache_size()  # another eta > 0: no compile, new images
    other_eta = pipe(a, ma, "a red ball", seed=5, num_steps=STEPS, eta=0.3)
    assert pipeline_lib._generate._cache_size() == compiled
    assert (np.asarray(other_eta) != np.asarray(singles[0])).any()


def test_unconditional_branch_is_empty_prompt_and_zero_tokens(pipe):
    """With guidance scale 0 only the unconditional branch counts: its result must depend
    neither on the prompt (empty prompt) nor on the image's CLIP features (zero tokens)."""
    image, mask = example(37, 29, seed=5)
    other = np.asarray(Image.fromarray(image).transpose(Image.Transpose.ROTATE_180))
    batch = pipe.prepare([(Image.fromarray(image), Image.fromarray(mask))])
    other_clip = pipe.prepare([(Image.fromarray(other), Image.fromarray(mask))])["masked224"]
    cat, dog = pipe._tokenize(["a cat"]), pipe._tokenize(["a dog"])
    uncond_cat = pipe.sample(dict(batch, input_ids=cat), [0], STEPS, guidance_scale=0.0)
    uncond_dog = pipe.sample(dict(batch, input_ids=dog, masked224=other_clip), [0], STEPS, 0.0)
    np.testing.assert_array_equal(uncond_cat, uncond_dog)
    guided_cat = pipe.sample(dict(batch, input_ids=cat), [0], STEPS, guidance_scale=2.0)
    guided_dog = pipe.sample(dict(batch, input_ids=dog), [0], STEPS, guidance_scale=2.0)
    assert (guided_cat != guided_dog).any()


def test_unconditional_branch_equals_its_spec(pipe):
    """SPEC.md §6 from the model's parts: at guidance 0 the sample is DDIM on the unconditional
    branch alone: the encoded empty prompt (not zeros), zero semantic tokens, and the same mask
    and masked latents as the prompt's branch (0.18215 x a posterior sample of masked512)."""
    import jax
    import jax.numpy as jnp

    from catflax import diffusion

    image, mask = example(37, 29, seed=7)
    batch = pipe.prepare([(Image.fromarray(image), Image.fromarray(mask))])
    batch["input_ids"] = pipe._tokenize(["a cat"])
    got = pipe.sample(batch, [3], STEPS, guidance_scale=0.0)

    model = pipe.model
    key = jax.random.key(3)
    empty_context, _ = model.encode_text(jnp.asarray(pipe._tokenize([""])))
    posterior = model.vae.encode(jnp.asarray(batch["masked512"]))
    eps = jax.random.normal(jax.random.fold_in(key, 1), posterior.mean.shape[1:])[None]
    masked_latents = model.vae.config.scaling_factor * (posterior.mean + posterior.std * eps)
    mask64 = jnp.asarray(batch["mask64"])
    tokens = jnp.zeros((1, 64, CFG.inpainter.hidden_size))

    def model_fn(x, t, cond):
        return model.predict_noise(x, t, mask64, masked_latents, empty_context, tokens)

    h, w = mask64.shape[1:3]
    latents = diffusion.ddim_sample(
        model_fn, None, key=key[None], shape=(1, h, w, CFG.unet.out_channels), num_steps=STEPS,
        guidance_scale=1.0, eta=0.0,
    )  # fmt: skip
    decoded = np.asarray(model.decode_latents(latents), np.float32)
    want = np.clip(decoded * 127.5 + 127.5, 0, 255).astype(np.uint8)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # 2B vs B batch rounding
    assert np.mean(got != want) < 0.01


def test_empty_mask_returns_the_input_with_a_message(pipe, saved, tmp_path):
    image, _ = example(37, 29, seed=6)
    with pytest.warns(InpaintWarning, match="mask is empty"):
        out = pipe(image, np.zeros((29, 37), np.uint8), "a cat", num_steps=STEPS)
    np.testing.assert_array_equal(np.asarray(out), image)
    Image.fromarray(image).save(tmp_path / "in.png")
    Image.fromarray(np.full((29, 37), 100, np.uint8)).save(tmp_path / "mask.png")  # < 128
    messages = []
    opts = inpaint.parse([
        f"--weights={saved}", f"--image={tmp_path / 'in.png'}", f"--mask={tmp_path / 'mask.png'}",
        "--prompt=a cat", f"--out={tmp_path / 'out.png'}",
    ])  # fmt: skip
    inpaint.run(opts, pipeline=pipe, report=messages.append)
    empty = [m for m in messages if "the mask is empty" in m]
    assert len(empty) == 1 and "mask.png" in empty[0] and "in.png unchanged" in empty[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out.png")), image)


def test_mask_size_mismatch_warns_and_works(pipe):
    image, mask = example(37, 29, seed=7)
    small = np.asarray(Image.fromarray(mask).resize((18, 14), Image.Resampling.NEAREST))
    with pytest.warns(InpaintWarning, match="mask is 18x14 but image 0 is 37x29"):
        out = pipe(image, small, "a cat", num_steps=STEPS)
    assert out.size == (37, 29)
    resized = np.asarray(Image.fromarray(small).resize((37, 29), Image.Resampling.NEAREST))
    np.testing.assert_array_equal(np.asarray(out)[resized == 0], image[resized == 0])


def test_masks_that_are_easy_to_misread(pipe, tmp_path):
    """0/1 masks, masks drawn by transparency, 16-bit masks, masks too thin for the model's
    resolution, and prompts longer than CLIP reads: each gets a message or is read right."""
    image, mask = example(37, 29, seed=10)
    with pytest.warns(InpaintWarning, match=r"brightest 1\) \(a 0/1 mask\?"):
        pipe(image, (mask // 255).astype(np.uint8), "a cat", num_steps=STEPS)
    by_alpha = np.zeros((29, 37, 4), np.uint8)
    by_alpha[..., :3], by_alpha[..., 3] = 255, mask
    with pytest.raises(ImageReadError, match="marks its area by transparency"):
        pipe(image, by_alpha, "a cat", num_steps=STEPS)
    Image.fromarray(mask.astype(np.uint16) * 257).save(tmp_path / "mask16.png")  # 0 / 65535
    assert Image.open(tmp_path / "mask16.png").mode.startswith("I")
    np.testing.assert_array_equal(
        np.asarray(pipe(image, str(tmp_path / "mask16.png"), "a cat", num_steps=STEPS)),
        np.asarray(pipe(image, mask, "a cat", num_steps=STEPS)),
    )
    as_int32 = Image.fromarray(mask.astype(np.int32))  # mode I holding 0..255: not scaled
    assert as_int32.mode == "I"
    np.testing.assert_array_equal(
        np.asarray(pipe(image, as_int32, "a cat", num_steps=STEPS)),
        np.asarray(pipe(image, mask, "a cat", num_steps=STEPS)),
    )
    big, thin = np.zeros((160, 160, 3), np.uint8), np.zeros((160, 160), np.uint8)
    thin[80, 40:120] = 255  # one pixel row: nothing of it is left at 16 px
    with pytest.warns(InpaintWarning, match="mask vanishes at the model's 16 px"):
        pipe(big, thin, "a cat", num_steps=STEPS)
    with pytest.warns(InpaintWarning, match="is 83 tokens; CLIP reads the first 77"):
        pipe(image, mask, "a " + "cat " * 80, num_steps=STEPS)


def test_feather_blends_only_near_the_mask_edge(pipe):
    image, mask = example(37, 29, seed=8)
    sharp = np.asarray(pipe(image, mask, "a cat", num_steps=STEPS, paste_back=False))
    soft = np.asarray(pipe(image, mask, "a cat", num_steps=STEPS, feather=3))
    np.testing.assert_array_equal(soft, paste_back(image, sharp, mask, feather=3))
    ys, xs = np.nonzero(mask)
    yy, xx = np.mgrid[:29, :37]
    far = (yy < ys.min() - 3) | (yy > ys.max() + 3) | (xx < xs.min() - 3) | (xx > xs.max() + 3)
    np.testing.assert_array_equal(soft[far], image[far])
    edge = (yy == ys.min() - 1) & (xx >= xs.min()) & (xx <= xs.max())  # just outside the mask
    assert (soft[edge] != image[edge]).any()
    centre = (yy == (ys.min() + ys.max()) // 2) & (xx == (xs.min() + xs.max()) // 2)
    np.testing.assert_array_equal(soft[centre], sharp[centre])


def test_missing_and_unreadable_files_are_named(pipe, saved, tmp_path):
    image, mask = example(37, 29, seed=9)
    Image.fromarray(mask).save(tmp_path / "mask.png")
    base = [f"--weights={saved}", f"--mask={tmp_path / 'mask.png'}", "--prompt=a cat",
            f"--out={tmp_path / 'out.png'}"]  # fmt: skip
    missing = tmp_path / "nowhere.png"
    with pytest.raises(FileNotFoundError, match=f"{missing}: image file not found"):
        inpaint.run(inpaint.parse([*base, f"--image={missing}"]), pipeline=pipe)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    Image.fromarray(image).save(tmp_path / "whole.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((tmp_path / "whole.png").read_bytes()[:200])

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    bomb = tmp_path / "bomb.png"  # a PNG that claims 20000x20000 pixels: PIL refuses to decode it
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b""))
    for bad in (garbage, truncated, bomb):
        with pytest.raises(ImageReadError, match=f"{bad}: not a readable image"):
            inpaint.run(inpaint.parse([*base, f"--image={bad}"]), pipeline=pipe)
        with pytest.raises(ImageReadError, match=f"{bad}: not a readable mask"):
            pipe(image, str(bad), "a cat")
    lines = tmp_path / "jobs.jsonl"
    lines.write_text('{"image": "whole.png", "mask": "mask.png", "prompt": "a"}\n{"image": 3}\n')
    with pytest.raises(ValueError, match=f"{lines}:2: needs string field"):
        inpaint.run(inpaint.parse([f"--weights={saved}", f"--batch={lines}",
                                   f"--out_dir={tmp_path}"]), pipeline=pipe)  # fmt: skip


def test_bad_options_are_refused_before_the_model_loads(tmp_path):
    """No pipeline is given: each error must come before CATPipeline.from_pretrained."""
    image, mask = example(37, 29, seed=9)
    Image.fromarray(image).save(tmp_path / "in.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    base = [f"--weights={tmp_path / 'absent'}", f"--image={tmp_path / 'in.png'}",
            f"--mask={tmp_path / 'mask.png'}", "--prompt=a cat"]  # fmt: skip
    noext, a_dir = tmp_path / "noext", tmp_path.parent / f"{tmp_path.name}.png"
    a_dir.mkdir()
    cases = {
        f"{noext}: output needs an image file extension": [f"--out={noext}"],
        f"{a_dir}: output path is a directory": [f"--out={a_dir}"],
        "o.psd: output needs an image file extension": [f"--out={tmp_path / 'o.psd'}"],
        "--feather=-1.0: must be >= 0": [f"--out={tmp_path / 'o.png'}", "--feather=-1"],
        f"{tmp_path / 'in.png'}: the output would overwrite the input": [
            f"--out={tmp_path / 'in.png'}"
        ],
        "--num_steps=0: must be >= 1; --guidance_scale=nan: must be a finite number": [
            f"--out={tmp_path / 'o.png'}",
            "--num_steps=0",
            "--guidance_scale=nan",
        ],
        "--seed=-1: seeds (one per job) must lie in [0, 2**32)": [
            f"--out={tmp_path / 'o.png'}",
            "--seed=-1",
        ],
        "--resolution=60: must be a positive multiple of 8": [
            f"--out={tmp_path / 'o.png'}",
            "--resolution=60",
        ],
    }
    for message, extra in cases.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            inpaint.run(inpaint.parse([*base, *extra]))
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"image": "in.png", "mask": "mask.png", "prompt": "a"}\n')
    batch = [base[0], "--prompt=x", f"--batch={jobs}", f"--out_dir={tmp_path}"]
    with pytest.raises(ValueError, match="--batch replaces --image/--mask/--prompt/--out"):
        inpaint.run(inpaint.parse(batch))
    # --out_dir the images' own folder: the default names (in.png) would replace the inputs.
    with pytest.raises(ValueError, match=r"in\.png: the output would overwrite the input"):
        inpaint.run(inpaint.parse([base[0], f"--batch={jobs}", f"--out_dir={tmp_path}"]))
    twice = '{"image": "in.png", "mask": "mask.png", "prompt": "a", "out": "o.png"}\n'
    jobs.write_text(twice * 2)
    with pytest.raises(ValueError, match=r"jobs\.jsonl:2: \"out\": 'o\.png' is line 1's too"):
        inpaint.run(inpaint.parse([base[0], f"--batch={jobs}", f"--out_dir={tmp_path}/r"]))
    with pytest.raises(Exception, match=re.escape("value should be one of <float32|bfloat16>")):
        inpaint.parse([*base, "--dtype=fp16"])


def test_command_line_error_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "catflax.inpaint", f"--weights={tmp_path}",
         f"--image={tmp_path / 'no.png'}", f"--mask={tmp_path / 'm.png'}", "--prompt=x",
         f"--out={tmp_path / 'o.png'}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"inpaint: {tmp_path / 'no.png'}: image file not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_batch_file_mode(pipe, saved, tmp_path):
    rows = []
    for i, (w, h) in enumerate([(37, 29), (20, 33), (16, 16)]):
        image, mask = example(w, h, seed=10 + i)
        Image.fromarray(image).save(tmp_path / f"img{i}.png")
        Image.fromarray(mask).save(tmp_path / f"mask{i}.png")
        rows.append({"image": f"img{i}.png", "mask": f"mask{i}.png", "prompt": f"thing {i}"})
    rows[2]["out"] = "img0.png"  # asked for by name: line 3 keeps it, line 1's default moves
    (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    opts = inpaint.parse([
        f"--weights={saved}", f"--batch={tmp_path / 'jobs.jsonl'}",
        f"--out_dir={tmp_path / 'results'}", "--batch_size=2", "--seed=4",
    ])  # fmt: skip
    written = inpaint.run(opts, pipeline=pipe, report=lambda m: None)
    assert [os.path.basename(p) for p in written] == ["img0_1.png", "img1.png", "img0.png"]
    for i, path in enumerate(written):
        image, mask = example(*Image.open(tmp_path / f"img{i}.png").size, seed=10 + i)
        single = pipe(image, mask, f"thing {i}", num_steps=STEPS, seed=4 + i)
        np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(single))


def cat_checkpoint(model: CATDiffusion, with_text: bool = True) -> dict:
    """The official CAT-Diffusion single-file layout of a model (see catflax.weights.ldm)."""
    state = {**ldm.unet_to_ldm(model.unet), **ldm.vae_to_ldm(model.vae)}
    state.update(model.inpainter.state_dict())  # fusion_model.*
    vision = lambda k: "cond_stage_model2.encoder." + k.replace("pre_layernorm", "pre_layrnorm")  # noqa: E731
    state.update(convert.export_state_dict(model.clip_vision, vision))
    if with_text:
        text = lambda k: "cond_stage_model.transformer." + k  # noqa: E731
        state.update(convert.export_state_dict(model.clip_text, text))
    state["betas"] = np.zeros(3, np.float32)  # schedule buffers: ignored
    return state


def test_official_checkpoint_loads_like_the_directory(pipe, tmp_path):
    image, mask = example(37, 29, seed=11)
    kw = dict(num_steps=STEPS, guidance_scale=7.5, seed=2)  # the checkpoint has no defaults
    expected = np.asarray(pipe(image, mask, "a red ball", **kw))
    cfg = {n: dataclasses.asdict(getattr(CFG, n)) for n in pipeline_format.COMPONENTS}

    path = str(tmp_path / "cat.safetensors")
    io.write_safetensors(path, cat_checkpoint(pipe.model))
    official = CATPipeline.from_pretrained(path, config=cfg, resolution=RES)
    assert_same_params(official.model, pipe.model)
    out = official(image, mask, "a red ball", **kw)
    np.testing.assert_array_equal(np.asarray(out), expected)

    # No text tower in the file: it comes from a transformers CLIP directory, with the tokenizer.
    clip_dir = tmp_path / "clip"
    clip_dir.mkdir()
    t = CFG.clip_text
    hf = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
              intermediate_size=t.intermediate_size, num_attention_heads=t.num_heads,
              max_position_embeddings=t.max_positions, eos_token_id=t.eos_token_id)  # fmt: skip
    (clip_dir / "config.json").write_text(json.dumps({"text_config": hf}))
    io.write_safetensors(str(clip_dir / "model.safetensors"),
                         convert.export_state_dict(pipe.model.clip_text))  # fmt: skip
    pipe.tokenizer.save_pretrained(str(clip_dir))
    path = str(tmp_path / "cat_no_text.safetensors")
    io.write_safetensors(path, cat_checkpoint(pipe.model, with_text=False))
    with pytest.raises(ValueError, match="cond_stage_model.transformer.* keys"):
        CATPipeline.from_pretrained(path, config=cfg, resolution=RES)
    official = CATPipeline.from_pretrained(
        path, clip_path=str(clip_dir), config=cfg, resolution=RES
    )
    assert_same_params(official.model, pipe.model)
    out = official(image, mask, "a red ball", **kw)
    np.testing.assert_array_equal(np.asarray(out), expected)

    # A CLIP directory with only a pickle: loaded with allow_pickle, refused without.
    import torch

    tensors = io.read_safetensors(str(clip_dir / "model.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, clip_dir / "pytorch_model.bin")
    os.remove(clip_dir / "model.safetensors")
    with pytest.raises(io.WeightFileError, match="pytorch_model.bin.*allow_pickle"):
        CATPipeline.from_pretrained(path, clip_path=str(clip_dir), config=cfg, resolution=RES)
    pickled = CATPipeline.from_pretrained(
        path, clip_path=str(clip_dir), config=cfg, resolution=RES, allow_pickle=True
    )
    assert_same_params(pickled.model, pipe.model)


def test_damaged_pipeline_configs_are_named(pipe, saved, tmp_path):
    """A hand-edited config.json: errors name the file and key; a folder holding another
    config.json (a training workdir) is not overwritten by save_pretrained."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    meta = json.loads((copy / "config.json").read_text())
    edits = {
        r"config.json: missing or malformed \['resolution'\]": lambda m: m.pop("resolution"),
        r"config.json: missing or malformed \['model.unet'\]": lambda m: m["model"].pop("unet"),
        r"config.json: sampling: unknown setting\(s\) \['steps'\]": (
            lambda m: m["sampling"].update(steps=3)
        ),
        r"config.json: model.unet.num_heads: expected int, got 'two'$": (
            lambda m: m["model"]["unet"].update(num_heads="two")
        ),
        r"config.json: model.vae.block_out_channels\[0\]: expected int, got '8'$": (
            lambda m: m["model"]["vae"].update(block_out_channels=["8"])
        ),
        r"config.json: model.clip_text.remat: expected bool, got 'no'$": (
            lambda m: m["model"]["clip_text"].update(remat="no")
        ),
        r"config.json: model.inpainter: expected a dict of fields, got 3$": (
            lambda m: m["model"].update(inpainter=3)
        ),
        r"config.json: model.unet: .*unexpected keyword argument 'bogus'": (
            lambda m: m["model"]["unet"].update(bogus=1)
        ),
    }
    for message, edit in edits.items():
        broken = json.loads(json.dumps(meta))
        edit(broken)
        (copy / "config.json").write_text(json.dumps(broken))
        with pytest.raises((io.WeightFileError, ValueError), match=message) as err:
            CATPipeline.from_pretrained(str(copy))
        assert str(err.value).startswith(str(copy / "config.json")), err.value
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"seed": 0}')
    with pytest.raises(io.WeightFileError, match="exists and is not a catflax pipeline config"):
        pipe.save_pretrained(str(workdir))
    assert json.loads((workdir / "config.json").read_text()) == {"seed": 0}
    pipe.save_pretrained(str(copy))  # over an earlier pipeline: allowed
    with pytest.warns(UserWarning, match="clip_path=elsewhere is not used"):
        CATPipeline.from_pretrained(str(copy), clip_path="elsewhere")


def test_bad_weights_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        CATPipeline.from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(io.WeightFileError, match="not a catflax pipeline directory"):
        CATPipeline.from_pretrained(str(tmp_path))
    path = str(tmp_path / "sd.safetensors")
    io.write_safetensors(path, {"model.diffusion_model.x": np.zeros(1, np.float32)})
    with pytest.raises(ValueError, match="not a CAT-Diffusion checkpoint"):
        CATPipeline.from_pretrained(path)


def test_bad_resolution_is_refused_before_the_weights_load(saved, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("weights loaded before the resolution was checked")

    monkeypatch.setattr(pipeline_format, "load_directory", no_loading)
    monkeypatch.setattr(io, "read_state_dict", no_loading)
    step = 2 ** (len(CFG.vae.block_out_channels) - 1 + len(CFG.unet.block_out_channels) - 1)
    for bad in (RES + step // 2, -RES):
        message = f"resolution={bad} must be a positive multiple of {step}"
        with pytest.raises(ValueError, match=message):
            CATPipeline.from_pretrained(saved, resolution=bad)
        checkpoint = tmp_path / "cat.safetensors"
        checkpoint.write_bytes(b"")  # never read
        with pytest.raises(ValueError, match=message):
            CATPipeline.from_pretrained(str(checkpoint), config=CFG, resolution=bad)


def test_a_bad_tokenizer_is_refused_before_the_weights_load(saved, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("weights loaded before the tokenizer")

    monkeypatch.setattr(pipeline_format, "load_directory", no_loading)
    monkeypatch.setattr(io, "read_state_dict", no_loading)
    folder = tmp_path / "pipeline"
    (folder / "tokenizer").mkdir(parents=True)  # empty
    (folder / "config.json").write_bytes((Path(saved) / "config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match=f"{folder / 'tokenizer'}: no CLIP tokenizer"):
        CATPipeline.from_pretrained(str(folder))
    checkpoint = tmp_path / "cat.safetensors"
    checkpoint.write_bytes(b"")  # never read
    with pytest.raises(FileNotFoundError, match=f"{folder / 'tokenizer'}: no CLIP tokenizer"):
        CATPipeline.from_pretrained(
            str(checkpoint), clip_path=str(folder / "tokenizer"), config=CFG, resolution=RES
        )


def test_package_import_does_not_import_jax():
    code = "import sys, catflax; assert 'jax' not in sys.modules; catflax.CATPipeline"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_photo_is_read_as_displayed(tmp_path):
    """A camera JPEG stored sideways with an EXIF orientation: read upright, as the user drew
    the mask on it."""
    from catflax.images import load_image

    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = 255  # left half white as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    Image.fromarray(stored).save(tmp_path / "photo.jpg", exif=exif, quality=100)
    image, _ = load_image(str(tmp_path / "photo.jpg"))
    assert image.size == (20, 40)  # displayed: 20 wide, 40 tall
    upright = np.asarray(image).astype(int)
    assert upright[:15].mean() > 200 and upright[25:].mean() < 50  # the white half on top
