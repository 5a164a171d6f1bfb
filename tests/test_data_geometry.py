"""SPEC.md §4 geometry for one example, checked against the spec's formulas."""

import cv2
import numpy as np
import pytest
from PIL import Image

from catflax.data import geometry

SIZES = geometry.Sizes(resolution=64, clip_resolution=32, patch_grid=16)


def test_crop_contains_extent_when_it_fits():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        size = int(rng.integers(8, 40))
        length = size + int(rng.integers(0, 60))
        first = int(rng.integers(0, length))
        last = int(rng.integers(first, min(length, first + 2 * size)))
        for crop_rng in (rng, None):  # random, and centred
            start = geometry.crop_offset(length, (first, last), size, crop_rng)
            assert 0 <= start <= length - size
            if last - first + 1 <= size:
                assert start <= first and last <= start + size - 1  # contains the extent
            elif crop_rng is None:
                assert first <= start and start + size - 1 <= last  # lies inside it
            else:  # the reference's crop_512: from the object's first row/column
                assert start == min(first, length - size)
    # every valid start is reachable: extent [10, 12] in 30 with a window of 8 -> starts 5..10
    found = {geometry.crop_offset(30, (10, 12), 8, rng) for _ in range(500)}
    assert found == set(range(5, 11))
    assert geometry.crop_offset(30, (10, 12), 8, None) == 7  # centred: (10+12)//2 - 4


def test_crop_around_mask_keeps_every_masked_pixel():
    rng = np.random.default_rng(1)
    for _ in range(50):
        h, w = (int(v) for v in rng.integers(64, 120, 2))
        mask = np.zeros((h, w), np.uint8)
        top, left = int(rng.integers(0, h - 30)), int(rng.integers(0, w - 30))
        mask[top : top + int(rng.integers(1, 30)), left : left + int(rng.integers(1, 30))] = 255
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        _, cropped = geometry.crop_around_mask(image, Image.fromarray(mask), 64, rng)
        assert (np.asarray(cropped) == 255).sum() == (mask == 255).sum()


def test_short_side_resize_follows_torchvision():
    assert geometry.short_side_size((640, 480), 512) == (682, 512)  # int(512*640/480) = 682
    assert geometry.short_side_size((333, 500), 64) == (64, 96)
    assert geometry.short_side_size((100, 100), 64) == (64, 64)


def test_mask_augmentation():
    mask = np.zeros((40, 50), np.uint8)
    mask[10:20, 15:30] = 255
    mask[18:20, 15:17] = 0  # a notch the box fills
    dilated = geometry.dilate(mask)
    reference = cv2.dilate(mask, np.ones((5, 5), np.uint8), iterations=1)  # the reference's
    np.testing.assert_array_equal(dilated, reference)
    soft = np.random.default_rng(0).integers(0, 256, (23, 31), dtype=np.uint8)  # borders, soft
    np.testing.assert_array_equal(geometry.dilate(soft), cv2.dilate(soft, np.ones((5, 5))))
    box = np.array([10 / 40, 15 / 50, 20 / 40, 30 / 50], np.float32)
    boxed = geometry.box_mask(mask.shape, box)
    assert boxed[10:20, 15:30].min() == 255 and boxed.sum() == 255 * 150
    coins = [geometry.augment_mask(mask, box, np.random.default_rng(s)).sum() for s in range(200)]
    assert set(coins) == {dilated.sum(), boxed.sum()}
    assert 70 < coins.count(dilated.sum()) < 130  # p = 0.5
    # no stored box: the mask's own extent
    no_box = geometry.augment_mask(mask, np.zeros(4), np.random.default_rng(1), dilate_prob=0)
    np.testing.assert_array_equal(no_box, boxed)


def soft_mask_example(train):
    """Block-aligned regions: 255 (fully masked), 40 (faintly masked), 0."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[0:32, 0:32] = 255
    mask[32:64, 32:64] = 40
    return image, mask, geometry.model_inputs(image, Image.fromarray(mask), SIZES, train)


@pytest.mark.parametrize("train", [True, False])
def test_model_inputs_follow_the_spec(train):
    image, mask, out = soft_mask_example(train)
    x = np.asarray(image, np.float64)
    m = mask[..., None] / 255.0
    np.testing.assert_allclose(out["image512"], x / 127.5 - 1, atol=1e-6)
    np.testing.assert_allclose(out["masked512"], x * (1 - m) / 127.5 - 1, atol=1e-5)
    assert (out["masked512"][:32, :32] == -1).all()  # fully masked -> black
    image224 = np.asarray(image.resize((32, 32), Image.BICUBIC))
    mask224 = np.asarray(Image.fromarray(mask).resize((32, 32), Image.BICUBIC))
    np.testing.assert_array_equal(out["image224"], image224)
    np.testing.assert_array_equal(out["mask224"], mask224)
    full, clear = mask224 == 255, mask224 == 0
    assert full.sum() > 100 and clear.sum() > 100
    assert (out["masked224"][full] == 127).all()
    np.testing.assert_array_equal(out["masked224"][clear], image224[clear])
    # Everywhere, soft edges and the faint region included: blended with m, then truncated.
    m224 = mask224[..., None] / 255.0
    expected = (image224 * (1 - m224) + 127 * m224).astype(np.uint8)
    assert ((mask224 > 0) & (mask224 < 255)).sum() > 100
    np.testing.assert_array_equal(out["masked224"], expected)
    # mask16: a 2x2 patch is 1 iff one of its pixels rounds to 1 (>= 128)
    patches = (np.round(mask224 / 255.0) > 0).reshape(16, 2, 16, 2).any(axis=(1, 3))
    np.testing.assert_array_equal(out["mask16"], patches.astype(np.int32))
    assert out["mask16"][:8, :8].all() and not out["mask16"][8:, 8:].any()  # 40 rounds to 0
    # mask64 (here 8x8): training marks anything > 0, evaluation >= 0.5
    mask64 = out["mask64"][..., 0]
    assert mask64[:3, :3].all()  # 255 region, in either mode
    assert mask64[5:, 5:].all() == train  # the faint 40/255 region, only when training
    assert not mask64[5:, :3].any() and not mask64[:3, 5:].any()
    soft64 = np.asarray(Image.fromarray(mask).resize((8, 8), Image.BICUBIC)) / 255.0
    np.testing.assert_array_equal(mask64, (soft64 > 0) if train else (soft64 >= 0.5))
    assert out["mask64"].dtype == np.float32 and out["mask16"].dtype == np.int32


def test_eval_resizes_without_crop():
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (50, 90, 3), dtype=np.uint8))
    mask = np.zeros((50, 90), np.uint8)
    mask[5:20, 60:85] = 255
    out = geometry.prepare_example(image, mask, np.zeros(4), SIZES, rng=None)
    expected = np.asarray(image.resize((64, 64)), np.float32) / 127.5 - 1
    np.testing.assert_allclose(out["image512"], expected, atol=1e-6)
    cropped = geometry.prepare_example(image, mask, np.zeros(4), SIZES, rng=None, eval_crop=True)
    assert (cropped["mask512"] >= 128).sum() > 0
    assert cropped["image512"].shape == (64, 64, 3)


def test_sizes_are_checked():
    with pytest.raises(ValueError, match="multiple of 8"):
        geometry.Sizes(resolution=60)
    with pytest.raises(ValueError, match="patch_grid"):
        geometry.Sizes(clip_resolution=100, patch_grid=16)


def test_mask_at_its_own_resolution_follows_the_reference():
    """OpenImages masks are not at their image's size: the reference dilates at the mask's
    resolution, resizes each from its own size and the image to the mask's (dataset.py)."""
    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    mask = np.zeros((20, 20), np.uint8)
    mask[8:12, 6:10] = 255
    out = geometry.prepare_example(image, mask, np.zeros(4), SIZES, rng, dilate_prob=1.0)
    dilated = np.zeros_like(mask)
    dilated[6:14, 4:12] = 255  # 5x5 in mask pixels: 2 on each side
    expected_mask = Image.fromarray(dilated).resize((64, 64), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(out["mask512"], np.asarray(expected_mask))
    expected_image = np.asarray(image.resize((64, 64), Image.Resampling.BILINEAR), np.float32)
    np.testing.assert_allclose(out["image512"], expected_image / 127.5 - 1, atol=1e-6)
    # evaluation: each resized to the output square from its own size
    evaluated = geometry.prepare_example(image, mask, np.zeros(4), SIZES, rng=None)
    np.testing.assert_array_equal(
        evaluated["mask512"], np.asarray(Image.fromarray(mask).resize((64, 64)))
    )
    # another aspect: the image follows the mask's short-side size (torchvision's truncation)
    wide = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))  # -> 85 x 64
    resized, resized_mask = geometry.resize_short_side(wide, Image.new("L", (32, 25)), 64)
    assert resized_mask.size == (81, 64) and resized.size == (81, 64)  # int(64 * 32 / 25) = 81
    expected = wide.resize((85, 64), Image.Resampling.BILINEAR).resize((81, 64))
    np.testing.assert_array_equal(np.asarray(resized), np.asarray(expected))


def test_eval_box_is_the_reference_rectangle():
    """Evaluation box masks: the reference draws a filled cv2.rectangle from
    (int(x*512), int(y*512)) to (int(x2*512), int(y2*512)), corners included."""
    for box in ([0.1, 0.2, 0.9, 0.8], [0.0, 0.0, 1.0, 1.0], [0.33, 0.51, 0.34, 0.77]):
        ymin, xmin, ymax, xmax = box
        reference = np.zeros((64, 64), np.uint8)
        corners = (int(xmin * 64), int(ymin * 64)), (int(xmax * 64), int(ymax * 64))
        cv2.rectangle(reference, *corners, 255, -1)
        got = geometry.box_mask((64, 64), np.asarray(box, np.float32), inclusive=True)
        np.testing.assert_array_equal(got, reference)
