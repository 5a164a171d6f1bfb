"""The evaluation command end to end on a tiny model and the synthetic dataset: generation sharded
over 8 devices (equal to CATPipeline.sample), images, metrics.json, contact sheet, errors."""

import dataclasses
import json

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from PIL import Image

from catflax import evaluate
from catflax.data import eval_examples
from catflax.metrics import inception
from catflax.models.cat import CATDiffusion
from catflax.pipeline import CATPipeline
from catflax.weights import convert, io
from tests.tiny import TINY_CAT

# The tiny model with the real CLIP vocabulary, so prompts go through the real tokenizer.
CFG = dataclasses.replace(
    TINY_CAT,
    clip_text=dataclasses.replace(TINY_CAT.clip_text, vocab_size=49408, eos_token_id=49407),
)
RES, STEPS, NUM = 16, 2, 5
DATASET = "synthetic_shapes/tiny"


def random_model(seed: int = 0) -> CATDiffusion:
    """The tiny model with random weights drawn on the host (an eager or jitted nnx init of a few
    hundred tensors takes 30-80 s on a busy 2-core machine)."""
    rng = np.random.default_rng(seed)

    def draw(path, var):
        shape, leaf = var.shape, path[-1]
        if leaf == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif leaf == "bias":
            value = 0.05 * rng.standard_normal(shape)
        else:  # kernels, embeddings, tables: unit variance after the contraction
            value = rng.standard_normal(shape) / np.sqrt(max(1, np.prod(shape[:-1])))
        return var.replace(jnp.asarray(value.astype(var.dtype)))

    graphdef, state = nnx.split(nnx.eval_shape(lambda: CATDiffusion(CFG, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.map_state(draw, state))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(pipeline, its export directory, a TFDS data_dir, a CLIP directory, an Inception file)."""
    root = tmp_path_factory.mktemp("evaluate")
    model = random_model()
    pipe = CATPipeline.from_model(
        model, resolution=RES, sampling=dict(num_steps=STEPS, guidance_scale=3.0, eta=0.0)
    )
    pipe.save_pretrained(str(root / "weights"))
    torch.manual_seed(0)
    text = dict(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, eos_token_id=49407, bos_token_id=49406,
                pad_token_id=49407)  # fmt: skip
    vision = dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                  num_hidden_layers=1, num_attention_heads=2)  # fmt: skip
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)
    transformers.CLIPModel(config).save_pretrained(root / "clip")
    # FID Inception weights: random, scaled so activations stay O(1) through the 94 convs.
    rng = np.random.default_rng(0)
    abstract = nnx.eval_shape(lambda: inception.InceptionV3(rngs=nnx.Rngs(0)))
    weights, names = {}, convert.torch_names(abstract)
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        src = names[path]
        shape = convert.expected_source_shape(var.get_value().shape, src.layout)
        positive = src.key.endswith(("running_var", "bn.weight"))
        scale = np.sqrt(2.0 / np.prod(shape[1:])) if src.layout == "conv" else 0.05
        sample = rng.uniform(0.5, 1.5, shape) if positive else rng.normal(0, scale, shape)
        weights[src.key] = sample.astype(np.float32)
    io.write_safetensors(str(root / "fid.safetensors"), weights)
    return (
        pipe,
        str(root / "weights"),
        str(root / "data"),
        str(root / "clip"),
        str(root / "fid.safetensors"),
    )


def args(setup, out, *extra):
    _, weights, data_dir, _, _ = setup
    return [f"--weights={weights}", f"--dataset={DATASET}", f"--data_dir={data_dir}",
            "--split=validation", f"--num={NUM}", f"--out={out}", "--batch_size=4",
            f"--num_steps={STEPS}", *extra]  # fmt: skip


def test_evaluate_writes_images_metrics_and_contact_sheet(setup, tmp_path, capsys):
    _, _, _, clip_dir, fid_file = setup
    out = tmp_path / "eval"
    code = evaluate.main(args(setup, out, "--masks=box", f"--clip={clip_dir}",
                              f"--inception={fid_file}"))  # fmt: skip
    assert code == 0
    with open(out / "metrics.json") as f:
        result = json.load(f)
    metrics, settings, rows = result["metrics"], result["settings"], result["examples"]
    assert metrics["count"] == NUM and len(rows) == NUM
    # FID and CLIP-FD from 5 images (singular covariances) are flagged, by name, in both places.
    fid_note, clip_note = result["warnings"]
    assert fid_note.startswith("FID from 5 images per set, not more than its 2048 feature")
    assert clip_note.startswith("CLIP-FD from 5 images per set, not more than its 8 feature")
    assert f"evaluate: warning: {fid_note}" in capsys.readouterr().out
    # Pasted back: every pixel outside the mask is the input's, exactly.
    assert metrics["mse_outside"] == 0.0 and metrics["psnr_outside"] == 100.0
    for key in ("fid", "clip_fd", "cmmd", "clip_score", "clip_score_crop"):
        assert isinstance(metrics[key], float) and np.isfinite(metrics[key]), (key, metrics[key])
    assert settings["devices"] == 8 and settings["batch_size"] == 8  # 4 rounded up to 8 devices
    assert [r["seed"] for r in rows] == list(range(NUM))
    for row in rows:
        image, original, mask = (
            np.asarray(Image.open(out / row[k])) for k in ("image", "input", "mask")
        )
        assert image.shape == original.shape == (RES, RES, 3) and mask.shape == (RES, RES)
        np.testing.assert_array_equal(mask, eval_examples.filled_box(mask))  # a filled box
        assert set(np.unique(mask)) <= {0, 255} and mask.any()
        np.testing.assert_array_equal(image[mask == 0], original[mask == 0])
        assert not np.array_equal(image[mask > 0], original[mask > 0])  # generated inside
        assert np.isfinite(row["clip_score"]) and row["psnr_outside"] == 100.0
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[0] == 3 * 128 and sheet.size[1] == NUM * (128 + 14)
    page = (out / "index.html").read_text()
    assert all(r["prompt"] in page and r["image"] in page for r in rows)


def test_sharded_sampling_equals_the_pipeline(setup):
    """The batch split over 8 devices gives what CATPipeline.sample gives on one."""
    pipe, _, data_dir, _, _ = setup
    from catflax.data import sources

    source = sources.open_tfds(DATASET, "validation", data_dir)
    examples, _ = eval_examples.read_examples(source, 8, "seg", RES)
    sampler = evaluate.ShardedSampler(pipe)
    batch = pipe.prepare([(Image.fromarray(e.image), e.model_mask) for e in examples])
    batch["input_ids"] = sampler.tokenize([e.prompt for e in examples])
    seeds = list(range(10, 18))
    on_devices = sampler.sample_on_devices(batch, seeds)
    assert len(on_devices.sharding.device_set) == 8
    assert on_devices.sharding.shard_shape(on_devices.shape)[0] == 1  # 8 examples / 8 devices
    reference = pipe.sample(batch, seeds)
    diff = np.abs(np.asarray(on_devices).astype(int) - reference.astype(int))
    print(
        f"sharded vs single-device samples: max |diff| {diff.max()} (uint8), mean {diff.mean():.4f}"
    )
    assert diff.max() <= 1 and diff.mean() < 0.01


def test_seg_masks_without_paste_back(setup, tmp_path):
    out = tmp_path / "seg"
    # The last seeds a uint32 holds: the batch's 5 padding examples must not go past them.
    top = f"--seed={2**32 - 3}"
    assert evaluate.main(args(setup, out, "--masks=seg", "--paste_back=false", "--num=3", top)) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert [r["seed"] for r in result["examples"]] == [2**32 - 3, 2**32 - 2, 2**32 - 1]
    assert set(result["metrics"]) == {"count", "reference_count", "mse_outside", "psnr_outside"}
    assert result["metrics"]["mse_outside"] > 0  # the VAE round trip changes the outside
    assert 0 < result["metrics"]["psnr_outside"] < 100
    # Seg masks are the dataset's object masks at the model resolution, thresholded.
    from catflax.data import records, sources

    record = sources.open_tfds(DATASET, "validation", setup[2])[0]
    image = records.decode_image(record["image"])
    mask = records.decode_mask(record["mask"], image.size)
    want = np.asarray(Image.fromarray(mask).resize((RES, RES))) >= 128
    np.testing.assert_array_equal(np.asarray(Image.open(out / "masks" / "00000.png")) > 0, want)
    # Again into the same folder with one example: the earlier images go (they would join a
    # folder-based FID's sets), FID/CLIP-FD are null (one image: no covariance), the rest is there.
    clip_dir = setup[3]
    assert evaluate.main(args(setup, out, "--masks=seg", "--num=1", f"--clip={clip_dir}")) == 0
    for folder in ("images", "inputs", "masks"):
        assert sorted(p.name for p in (out / folder).iterdir()) == ["00000.png"]
    result = json.loads((out / "metrics.json").read_text())
    metrics = result["metrics"]
    assert metrics["count"] == 1 and metrics["clip_fd"] is None
    assert result["warnings"] == ["CLIP-FD needs at least 2 images (a covariance): null"]
    assert np.isfinite([metrics["clip_score"], metrics["cmmd"]]).all()


def test_examples_get_soft_masks_and_stored_boxes():
    """seg: the model gets the mask resized soft (SPEC.md §4), paste-back its threshold; box: the
    record's stored (annotated) box drawn at the model resolution, not the mask's extent."""
    from catflax.data import records

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    mask = np.zeros((40, 60), np.uint8)
    mask[12:25, 20:33] = 255
    box = np.array([0.1, 0.2, 0.9, 0.8], np.float32)  # looser than the mask, as annotations are
    record = dict(image=_png(image), mask=records.encode_png(mask), box=box, example_id="e0",
                  label="a ball")  # fmt: skip
    (seg,), _ = eval_examples.read_examples([record], 1, "seg", 32)
    soft = np.asarray(Image.fromarray(mask).resize((32, 32)))
    np.testing.assert_array_equal(seg.model_mask, soft)
    assert ((soft > 0) & (soft < 255)).any()  # soft edges reach the model
    np.testing.assert_array_equal(seg.mask, np.where(soft >= 128, 255, 0))
    (boxed,), _ = eval_examples.read_examples([record], 1, "box", 32)
    reference = np.zeros((32, 32), np.uint8)  # the reference's filled cv2.rectangle (x, y)
    cv2.rectangle(reference, (6, 3), (25, 28), 255, -1)  # int(0.2 * 32), ..., int(0.9 * 32)
    np.testing.assert_array_equal(boxed.mask, reference)
    np.testing.assert_array_equal(boxed.model_mask, boxed.mask)
    no_box = dict(record, box=np.zeros(4, np.float32))  # none stored: the mask's extent
    (extent,), _ = eval_examples.read_examples([no_box], 1, "box", 32)
    np.testing.assert_array_equal(extent.mask, eval_examples.filled_box(seg.mask))


def test_unusable_records_are_skipped_and_counted():
    """Pairs without a mask, undecodable images and masks, and masks that vanish at the model
    resolution are skipped, counted by reason up to the last example taken."""
    from catflax.data import records

    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    mask, speck = np.zeros((40, 60), np.uint8), np.zeros((40, 60), np.uint8)
    mask[10:30, 20:40], speck[5, 5] = 255, 255  # one pixel: gone when resized to 16 px
    good = dict(image=_png(image), mask=records.encode_png(mask), box=np.zeros(4, np.float32),
                example_id="good", label="a ball")  # fmt: skip
    source = [
        dict(good, mask=b""),  # a text-image pair
        dict(good, image=_png(image)[:100]),  # truncated
        dict(good, mask=records.encode_png(np.zeros_like(mask))),
        dict(good, mask=records.encode_png(speck)),
        dict(good, mask=b"not a png"),
        good,
        dict(good, image=b"junk"),  # after the last example taken: not counted
        dict(good, example_id="last"),
    ]
    for masks in ("seg", "box"):
        examples, skipped = eval_examples.read_examples(source, 1, masks, 16)
        assert [e.example_id for e in examples] == ["good"], masks
        assert skipped == dict(no_mask=1, corrupt=2, empty_mask=2), masks
    examples, skipped = eval_examples.read_examples(source, 5, "seg", 16)
    assert [e.index for e in examples] == [5, 7] and skipped["corrupt"] == 3


def test_report_settings_are_checked():
    from ml_collections import ConfigDict

    from catflax import report

    config = ConfigDict(dict(report=dict(num_images=8, batch_size=4, grid_rows=2)))
    report.check_config(config)
    config.report.num_images = 0  # was a ZeroDivisionError after the whole training run
    with pytest.raises(ValueError, match="config.report.num_images=0 must be a positive"):
        report.check_config(config)


def _png(array_HWC: np.ndarray) -> bytes:
    import io as io_lib

    buffer = io_lib.BytesIO()
    Image.fromarray(array_HWC).save(buffer, format="PNG")
    return buffer.getvalue()


def test_filled_box():
    mask = np.zeros((10, 12), np.uint8)
    mask[2, 3] = mask[6, 8] = 255
    mask[9, 0] = 100  # below 128: not masked
    box = eval_examples.filled_box(mask)
    assert box[2:7, 3:9].min() == 255 and box.sum() == 255 * 5 * 6
    assert not eval_examples.filled_box(np.zeros((4, 4), np.uint8)).any()


def test_bad_input_is_a_clear_error(setup, tmp_path, capsys):
    assert evaluate.main(args(setup, tmp_path, "--masks=ellipse")) == 1
    assert "--masks='ellipse'" in capsys.readouterr().err
    assert evaluate.main(args(setup, tmp_path, "--split=nope")) == 1
    assert "no split 'nope'" in capsys.readouterr().err
    assert evaluate.main(args(setup, tmp_path, "--sheet_rows=0")) == 1
    assert "--sheet_rows=0" in capsys.readouterr().err
    # Refused before anything loads (a negative or too large seed was an OverflowError there).
    for flag, message in (
        ("--seed=-1", "--seed=-1: seed + i (i < --num=5) must be in [0, 2**32)"),
        (f"--seed={2**32 - 4}", f"--seed={2**32 - 4}: seed + i"),
        ("--batch_size=0", "--batch_size=0 must be positive"),
        (f"--out={tmp_path / 'file'}", "file is a file, not a folder"),
        ("--out=gs://bucket/eval", "--out=gs://bucket/eval: give a local folder"),  # was ./gs:/
    ):
        (tmp_path / "file").write_text("")
        assert evaluate.main(args(setup, tmp_path, flag)) == 1, flag
        assert message in capsys.readouterr().err, flag
    assert evaluate.main([f"--out={tmp_path}"]) == 1
    assert "missing --weights, --dataset" in capsys.readouterr().err
    assert evaluate.main(args(setup, tmp_path, f"--clip={tmp_path / 'none'}")) == 1
    assert "none" in capsys.readouterr().err
    assert jax.device_count() == 8
