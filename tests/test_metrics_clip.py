"""CLIP score, mask crops and CLIP embeddings: parity with transformers' CLIPModel."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from catflax.metrics import clip_score, distances
from catflax.preprocess import clip_normalize
from catflax.tokenizer import load_tokenizer, tokenize
from catflax.weights.io import WeightFileError
from tests.torch_utils import perturb_vectors

# The real CLIP vocabulary (so prompts go through our tokenizer), tiny widths.
TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
            eos_token_id=49407, bos_token_id=49406, pad_token_id=49407)  # fmt: skip
VISION = dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu")  # fmt: skip
PROMPTS = ["a cat", "a red sports car parked on the street", "dog", "a bowl of fruit"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24)
    model = transformers.CLIPModel(config).eval()
    torch.manual_seed(5)  # (a draw whose scores fall on both sides of the clamp at 0)
    perturb_vectors(model)  # every LayerNorm and bias non-trivial
    path = str(tmp_path_factory.mktemp("clip") / "clip")
    model.save_pretrained(path)
    # Its tokenizer as transformers 5 saves one: tokenizer.json only, no vocab.json.
    load_tokenizer().save_pretrained(path)
    return model, path


def _torch_features(fn, **kwargs):
    with torch.no_grad():
        out = fn(**kwargs)
    return (out if isinstance(out, torch.Tensor) else out.pooler_output).numpy()


def _torch_image_embeddings(model, scorer, images):
    """transformers' own preprocessing (CLIPImageProcessorPil: no torchvision here) and model."""
    size = scorer.image_size
    processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    pixels = processor(images=list(images), return_tensors="np")["pixel_values"]
    return _torch_features(model.get_image_features, pixel_values=torch.from_numpy(pixels))


def _cos(a, b):
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_clip_scores_match_transformers(tiny_clip):
    model, path = tiny_clip
    scorer = clip_score.CLIPScorer.from_pretrained(path, batch_size=8)
    assert scorer.tokenizer.name_or_path == path  # the directory's, not openai-clip's BPE
    rng = np.random.default_rng(0)
    # Ten images of assorted sizes: a batch of 8 sharded over the 8 devices, then a padded one.
    images = [rng.integers(0, 256, (40 + 3 * i, 50 - 2 * i, 3), dtype=np.uint8) for i in range(10)]
    prompts = PROMPTS * 2 + PROMPTS[:2]
    masks = [np.zeros(im.shape[:2], np.uint8) for im in images]
    for i, m in enumerate(masks[1:], 1):
        m[i : i + 12, 2 * i : 2 * i + 7] = 255
    # masks[0] is empty: no crop score

    ids = tokenize(prompts, scorer.tokenizer)
    text_ref = _torch_features(model.get_text_features, input_ids=torch.from_numpy(ids).long())
    text = scorer.embed_prompts(prompts)
    np.testing.assert_allclose(text, text_ref, atol=1e-5, rtol=1e-5)

    image_ref = _torch_image_embeddings(model, scorer, images)
    image = scorer.embed_images(images)
    np.testing.assert_allclose(image, image_ref, atol=1e-5, rtol=1e-5)

    crops = [clip_score.crop_to_mask(im, m) for im, m in zip(images[1:], masks[1:])]
    crop_ref = _torch_image_embeddings(model, scorer, crops)

    got = scorer.scores(prompts, images, masks)
    ref_full = 100 * np.maximum(_cos(text_ref, image_ref), 0)
    ref_crop = 100 * np.maximum(_cos(text_ref[1:], crop_ref), 0)
    assert (ref_full > 0).any() and (ref_full == 0).any()  # both sides of the clamp
    cos_err = max(
        np.abs(_cos(text, image) - _cos(text_ref, image_ref)).max(),
        np.abs(got["clip_score_crop"][1:] - ref_crop).max() / 100,
    )
    print(f"CLIP cosine max abs err {cos_err:.2e}")
    assert cos_err < 1e-4
    np.testing.assert_allclose(got["clip_score"], ref_full, atol=1e-2)
    assert np.isnan(got["clip_score_crop"][0])
    np.testing.assert_allclose(got["clip_score_crop"][1:], ref_crop, atol=1e-2)

    with pytest.raises(ValueError, match="one prompt and one mask per image"):
        scorer.scores(prompts[:3], images)


def test_cmmd_and_clip_fd_on_clip_embeddings(tiny_clip):
    """The metrics on real embeddings: a set against itself is 0, against others positive."""
    _, path = tiny_clip
    scorer = clip_score.CLIPScorer.from_pretrained(path, batch_size=4)
    rng = np.random.default_rng(1)
    real = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(6)]
    fake = [np.clip(im.astype(int) // 2 + 100, 0, 255).astype(np.uint8) for im in real]
    emb_real, emb_fake = scorer.embed_images(real), scorer.embed_images(fake)
    assert abs(distances.cmmd(emb_real, emb_real)) < 1e-9
    assert distances.cmmd(emb_real, emb_fake) > 0
    stats_real = distances.feature_statistics(emb_real)
    assert abs(distances.frechet_distance_of(stats_real, stats_real)) < 1e-6
    assert distances.frechet_distance_of(stats_real, distances.feature_statistics(emb_fake)) > 0


def test_mask_crop_geometry():
    image = np.arange(20 * 30 * 3).reshape(20, 30, 3).astype(np.uint8)
    mask = np.zeros((20, 30), np.uint8)
    assert clip_score.mask_square_box(mask) is None and clip_score.crop_to_mask(image, mask) is None
    mask[4:8, 10:20] = 200  # 4 x 10 box: a 10-square centred on it, rows 1..11
    assert clip_score.mask_square_box(mask) == (1, 10, 10)
    np.testing.assert_array_equal(clip_score.crop_to_mask(image, mask), image[1:11, 10:20])
    mask[:] = 0
    mask[0:2, 25:30] = 255  # at the corner: the square is shifted inside the image
    mask[5, 29] = 127  # 127 is outside the mask
    assert clip_score.mask_square_box(mask[..., None]) == (0, 25, 5)
    mask[:] = 0
    mask[5:7, 0:26] = 255  # wider than the image is tall: padded with black
    top, left, side = clip_score.mask_square_box(mask)
    assert (top, left, side) == (-3, 0, 26)
    crop = clip_score.crop_to_mask(image, mask)
    assert crop.shape == (26, 26, 3)
    np.testing.assert_array_equal(crop[3:23], image[:, :26])
    assert (crop[:3] == 0).all() and (crop[23:] == 0).all()


def test_projections_need_a_full_clip_model(tmp_path):
    torch.manual_seed(1)
    vision = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION))
    vision.save_pretrained(str(tmp_path / "vision"))
    with pytest.raises(WeightFileError, match="text_projection.weight.*full CLIPModel"):
        clip_score.CLIPProjections.from_pretrained(str(tmp_path / "vision"))


# Three images per set: the Frechet distances warn (singular covariances), as they should.
@pytest.mark.filterwarnings("ignore::catflax.metrics.distances.SmallSampleWarning")
def test_compute_metrics_runs_every_metric(tiny_clip, tmp_path):
    """The evaluate command's one call: each entry equals the metric computed on its own."""
    from flax import nnx

    from catflax.metrics import features, inception, preservation, suite
    from catflax.weights import convert

    _, path = tiny_clip
    scorer = clip_score.CLIPScorer.from_pretrained(path, batch_size=2)
    rng = np.random.default_rng(2)
    # Random weights through the loader (initialising 94 convs eagerly takes 20 s on 2 cores).
    cfg = inception.InceptionConfig(resize_to=None)
    abstract = nnx.eval_shape(lambda: inception.InceptionV3(cfg, rngs=nnx.Rngs(0)))
    weights, names = {}, convert.torch_names(abstract)
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        src = names[path]
        shape = convert.expected_source_shape(var.get_value().shape, src.layout)
        positive = src.key.endswith(("running_var", "bn.weight"))
        scale = np.sqrt(2.0 / np.prod(shape[1:])) if src.layout == "conv" else 0.05
        sample = rng.uniform(0.5, 1.5, shape) if positive else rng.normal(0, scale, shape)
        weights[src.key] = sample.astype(np.float32)
    net, _ = convert.load_state_dict(abstract, weights, source_name="random")
    originals = rng.integers(0, 256, (3, 80, 80, 3), dtype=np.uint8)
    masks = np.zeros((3, 80, 80), np.uint8)
    masks[:, 20:50, 30:60] = 255
    generated = np.where(masks[..., None] > 127, 255 - originals, originals).astype(np.uint8)
    generated[0, :5] = 0  # some change outside the mask too
    summary, per_example = suite.compute_metrics(  # batches of 2: preservation in two parts
        list(generated), list(originals), list(masks), PROMPTS[:3], inception=net, clip=scorer,
        batch_size=2,
    )  # fmt: skip
    assert summary["count"] == 3 and per_example["clip_score_crop"].shape == (3,)
    expect = preservation.preservation_metrics(generated, originals, masks)
    assert summary["mse_outside"] == expect["mse_outside"] > 0
    assert summary["psnr_outside"] == expect["psnr_outside"]
    outside = (masks <= 127)[..., None].repeat(3, -1)
    diff = (generated.astype(np.float64) - originals) / 255.0
    mse = [np.mean(d[o] ** 2) for d, o in zip(diff, outside)]  # the definition, in floats
    np.testing.assert_allclose(per_example["mse_outside"], mse, rtol=1e-12)
    fid = distances.frechet_distance_from_features(
        features.inception_features(net, originals, 2),
        features.inception_features(net, generated, 2),
    )  # the same batches (XLA's float32 convolutions vary in the last bits with the batch)
    np.testing.assert_allclose(summary["fid"], fid, rtol=1e-6)
    emb_real, emb_fake = scorer.embed_images(originals), scorer.embed_images(generated)
    np.testing.assert_allclose(summary["cmmd"], distances.cmmd(emb_real, emb_fake), rtol=1e-6)
    scores = scorer.scores(PROMPTS[:3], generated, masks)
    np.testing.assert_allclose(summary["clip_score"], scores["clip_score"].mean(), rtol=1e-6)
    clip_fd = distances.frechet_distance_from_features(emb_real, emb_fake)
    np.testing.assert_allclose(summary["clip_fd"], clip_fd, rtol=1e-6)
    assert np.isfinite([summary[k] for k in ("fid", "clip_fd", "clip_score_crop")]).all()
    # The same sets as PNG files read a batch at a time (what catflax.evaluate passes): the same
    # numbers, and never more than a batch (2 here, CLIP's too) decoded by one access.
    from catflax.metrics.image_sets import ImageFiles

    reads = []

    class CountedFiles(ImageFiles):
        def __getitem__(self, index):
            out = super().__getitem__(index)
            reads.append(len(out) if isinstance(index, slice) else 1)
            return out

    def files(arrays, name, mode="RGB"):
        paths = [str(tmp_path / f"{name}{i}.png") for i in range(len(arrays))]
        for array, path in zip(arrays, paths):
            Image.fromarray(array).save(path)
        return CountedFiles(paths, mode)

    on_disk = suite.compute_metrics(
        files(generated, "g"), files(originals, "o"), files(masks, "m", "L"), PROMPTS[:3],
        inception=net, clip=scorer, batch_size=2,
    )  # fmt: skip
    assert on_disk[0] == summary and reads and max(reads) <= 2
    as_iterators = suite.compute_metrics(
        iter(generated), iter(originals), iter(masks), PROMPTS[:3], inception=net, clip=scorer,
        batch_size=2,
    )  # fmt: skip
    assert as_iterators[0] == summary
    for name, values in per_example.items():
        np.testing.assert_array_equal(on_disk[1][name], values)
    # One image: no covariance, so FID and CLIP-FD are NaN; the rest is computed.
    one, _ = suite.compute_metrics(
        [generated[0]], [originals[0]], [masks[0]], PROMPTS[:1], inception=net, clip=scorer
    )
    assert np.isnan(one["fid"]) and np.isnan(one["clip_fd"])
    assert np.isfinite([one[k] for k in ("cmmd", "clip_score", "mse_outside")]).all()
    with pytest.raises(ValueError, match="no generated images"):
        suite.compute_metrics([], [], [], [])


def test_float_images_are_refused(tiny_clip):
    """CLIPScorer takes uint8 images: floats are refused in either scale (those in [0, 1] would
    be 255 times too dark); the model's embed_image takes clip_normalize's pixels, not 0..255."""
    model, path = tiny_clip
    scorer = clip_score.CLIPScorer.from_pretrained(path, batch_size=2)
    image = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    image[0, 0], image[0, 1] = 0, 255
    for floats, top in ((image.astype(np.float32), "255.0"), (image / 255.0, "1.0")):
        expect = rf"^images: float values in \[0.0, {top}\]; expected uint8 0..255 \("
        with pytest.raises(ValueError, match=expect):  # (compute_metrics' reference set, too)
            scorer.embed_images([floats])
    with pytest.raises(ValueError, match=r"^pixels_BHWC: float values in \[0.0, 255.0\]; "):
        scorer.model.embed_image(jnp.asarray(image[None], jnp.float32))
    pixels = clip_normalize(image[None])  # in range: embedded as transformers does
    ref = _torch_image_embeddings(model, scorer, [image])
    np.testing.assert_allclose(scorer.model.embed_image(pixels), ref, atol=1e-5, rtol=1e-5)
