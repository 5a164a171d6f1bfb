"""TFDS builders on tiny source folders made here: counts, skips with reasons, stored content."""

import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from catflax import paths
from catflax.data import prepare, records, synthetic


def jpeg(path, w, h, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, "JPEG")
    with open(path, "rb") as f:
        return f.read()


def truncate(path):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


def read_split(data_dir, name, split):
    import tensorflow_datasets as tfds

    from catflax.data import builders

    del builders
    source = tfds.builder(name, data_dir=data_dir).as_data_source(split)
    out = {}
    for i in range(len(source)):
        record = source[i]
        out[records.text(record["example_id"])] = record
    return out


def stored_mask(record):
    return records.decode_mask(record["mask"])


# ---- COCO ----

BLOB = np.zeros((48, 64), np.uint8)
BLOB[5:20, 30:55] = 1
BLOB[12:30, 40:50] = 1
DISC = (np.hypot(*np.mgrid[-30:30, -40:40]) < 18).astype(np.uint8)  # 60 x 80


@pytest.fixture(scope="module")
def coco_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    os.makedirs(root / "annotations")
    os.makedirs(root / "train2017")
    os.makedirs(root / "val2017")
    sizes = {1: (64, 48), 2: (80, 60), 3: (64, 48), 4: (64, 48)}
    files = {}
    for image_id, (w, h) in sizes.items():
        files[image_id] = jpeg(root / "train2017" / f"{image_id:012d}.jpg", w, h, image_id)
    truncate(root / "train2017" / f"{3:012d}.jpg")  # corrupt: half a JPEG
    jpeg(root / "val2017" / f"{5:012d}.jpg", 64, 48, 5)

    compressed = mask_utils.encode(np.asfortranarray(BLOB))
    compressed["counts"] = compressed["counts"].decode("ascii")
    counts, value, run = [], 0, 0  # uncompressed RLE: run lengths, column-major, zeros first
    for pixel in DISC.flatten(order="F"):
        if pixel == value:
            run += 1
        else:
            counts.append(run)
            value, run = pixel, 1
    counts.append(run)
    rectangle = [[10, 8, 40, 8, 40, 30, 10, 30]]
    two_parts = [[0, 0, 20, 0, 20, 10, 0, 10], [44, 38, 64, 38, 64, 48, 44, 48]]
    uncompressed = {"size": [60, 80], "counts": counts}

    def ann(ann_id, image_id, category_id, segmentation, bbox=None, iscrowd=0):
        out = dict(id=ann_id, image_id=image_id, category_id=category_id, iscrowd=iscrowd)
        return out | dict(segmentation=segmentation) | (dict(bbox=bbox) if bbox else {})

    anns = [
        ann(10, 1, 1, rectangle, bbox=[10, 8, 30, 22]),  # polygon
        ann(11, 1, 2, compressed, bbox=[30, 5, 25, 25]),  # compressed RLE
        ann(12, 2, 1, uncompressed, bbox=[22, 12, 36, 36]),  # uncompressed RLE
        ann(13, 2, 2, compressed | {"size": [60, 80]}, iscrowd=1),  # crowd
        ann(14, 2, 2, [[1, 1, 3, 1, 3, 3]]),  # too small
        ann(15, 3, 1, rectangle),  # on the corrupt image
        ann(16, 3, 2, rectangle),  # on the corrupt image
        ann(17, 1, 2, two_parts, bbox=[0, 0, 64, 48]),  # two polygons, one object
    ]
    categories = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    images = [
        {"id": i, "file_name": f"{i:012d}.jpg", "width": w, "height": h}
        for i, (w, h) in sizes.items()
    ]
    with open(root / "annotations" / "instances_train2017.json", "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": categories}, f)
    val = {
        "images": [{"id": 5, "file_name": f"{5:012d}.jpg", "width": 64, "height": 48}],
        "annotations": [dict(id=20, image_id=5, category_id=1, segmentation=rectangle, iscrowd=0)],
        "categories": categories,
    }
    with open(root / "annotations" / "instances_val2017.json", "w") as f:
        json.dump(val, f)
    with open(root / "long_captions_train.jsonl", "w") as f:
        f.write(json.dumps({"key": "11", "caption": "a fluffy brown dog"}) + "\n")
    return root, files


@pytest.fixture(scope="module")
def coco_built(coco_source, tmp_path_factory):
    """Built through the command line, as a user would."""
    root, files = coco_source
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    command = [sys.executable, "-m", "catflax.data.prepare", "--dataset=coco_inpaint"]
    command += [f"--source={root}", f"--data_dir={data_dir}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return data_dir, files, result.stdout


def test_coco_counts_and_reasons(coco_built):
    data_dir, _, stdout = coco_built
    assert "train: written 4, skipped 4" in stdout
    assert "corrupt_image: 2 (e.g. 000000000003.jpg)" in stdout
    assert "crowd: 1 (e.g. 13)" in stdout
    assert "too_small: 1 (e.g. 14)" in stdout
    assert "validation: written 1, skipped 0" in stdout
    report_path = Path(data_dir) / "coco_inpaint/default/1.0.0" / records.REPORT_FILE
    report = json.loads(report_path.read_text())
    assert report["train"]["skipped"] == {"corrupt_image": 2, "crowd": 1, "too_small": 1}
    assert report["train"]["written"] == 4


def test_coco_records(coco_built):
    data_dir, files, _ = coco_built
    train = read_split(data_dir, "coco_inpaint", "train")
    key = "coco/train2017/{:012d}.jpg#{}".format
    assert set(train) == {key(1, 10), key(1, 11), key(2, 12), key(1, 17)}
    rect, blob, disc, parts = (train[key(i, a)] for i, a in ((1, 10), (1, 11), (2, 12), (1, 17)))
    assert rect["image"] == files[1] and disc["image"] == files[2]  # the source bytes, untouched
    assert records.text(rect["label"]) == "cat" and records.text(blob["label"]) == "dog"
    np.testing.assert_array_equal(stored_mask(blob), BLOB * 255)  # compressed RLE, exact
    np.testing.assert_array_equal(stored_mask(disc), DISC * 255)  # uncompressed RLE, exact
    drawn = Image.new("L", (64, 48))
    ImageDraw.Draw(drawn).rectangle((10, 8, 39, 29), fill=255)
    got, want = stored_mask(rect) > 0, np.asarray(drawn) > 0
    assert (got & want).sum() / (got | want).sum() > 0.9  # polygon rasterisation
    two = stored_mask(parts) > 0
    assert two[:10, :20].mean() > 0.9 and two[38:, 44:].mean() > 0.9 and not two[20:30].any()
    np.testing.assert_allclose(rect["box"], [8 / 48, 10 / 64, 30 / 48, 40 / 64], rtol=1e-6)
    assert records.text(blob["caption"]) == "a fluffy brown dog"
    assert records.text(rect["caption"]) == ""
    assert len(read_split(data_dir, "coco_inpaint", "validation")) == 1


def test_coco_bad_long_caption_lines_are_warnings(coco_source, tmp_path, caplog):
    """A bad long-caption line costs only that caption: counted as a warning, not a skip."""
    root = tmp_path / "coco"
    shutil.copytree(coco_source[0], root)
    with open(root / "long_captions_train.jsonl", "wb") as f:
        f.write(json.dumps({"key": "11", "caption": "a fluffy brown dog"}).encode() + b"\n")
        f.write(b"{not json\n")  # line 2
        f.write(b'{"key": "10", "caption": "caf\xe9"}\n')  # line 3: not UTF-8
        f.write(json.dumps({"caption": "no key"}).encode() + b"\n")  # line 4
    data_dir = str(tmp_path / "tfds")
    with caplog.at_level(logging.WARNING):
        report = prepare.prepare("coco_inpaint", data_dir, str(root))
    assert report["train"]["written"] == 4
    assert report["train"]["skipped"] == {"corrupt_image": 2, "crowd": 1, "too_small": 1}
    assert report["train"]["warnings"] == {"bad_long_caption": 3}
    samples = report["train"]["samples"]["bad_long_caption"]
    assert [s.split(" ")[0] for s in samples] == [
        "long_captions_train.jsonl:2", "long_captions_train.jsonl:3", "long_captions_train.jsonl:4"
    ]  # fmt: skip
    assert "long_captions_train.jsonl:2" in caplog.text
    printed = prepare.format_counts(report)
    assert "train: written 4, skipped 4, warnings 3" in printed
    assert "\n  warning: bad_long_caption: 3 (e.g. long_captions_train.jsonl:2 (" in printed
    assert printed.endswith("\nvalidation: written 1, skipped 0")  # no warnings: not shown
    train = read_split(data_dir, "coco_inpaint", "train")
    assert records.text(train["coco/train2017/000000000001.jpg#11"]["caption"]) == (
        "a fluffy brown dog"
    )


# ---- OpenImages ----


@pytest.fixture(scope="module")
def openimages_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("openimages")
    os.makedirs(root / "train")
    os.makedirs(root / "train-masks" / "a")
    with open(root / "oidv6-class-descriptions.csv", "w") as f:
        f.write("LabelName,DisplayName\n/m/01,Cat\n/m/02,Dog\n")
    images = {iid: jpeg(root / "train" / f"{iid}.jpg", 64, 48, n) for n, iid in enumerate("abcd")}
    os.remove(root / "train" / "d.jpg")  # listed, missing
    truncate(root / "train" / "b.jpg")
    half = np.zeros((24, 32), np.uint8)
    half[4:14, 6:20] = 255
    masks = dict.fromkeys(["a_m01_1.png", "b_m01_4.png", "c_m02_5.png", "a_m03_3.png"], half)
    masks |= {"d_m01_8.png": half, "c_m01_6.png": np.zeros((24, 32), np.uint8)}
    for name, array in masks.items():
        Image.fromarray(array).save(root / "train-masks" / "a" / name)
    (root / "train-masks" / "a" / "a_m02_2.png").write_bytes(b"not a png")
    rows = [
        ("a_m01_1.png", "a", "/m/01", "1"),  # written
        ("a_m02_2.png", "a", "/m/02", "2"),  # unreadable mask
        ("a_m03_3.png", "a", "/m/03", "3"),  # unknown label
        ("b_m01_4.png", "b", "/m/01", "4"),  # corrupt image
        ("c_m02_5.png", "c", "/m/02", "5"),  # written
        ("c_m01_6.png", "c", "/m/01", "6"),  # empty mask
        ("c_m01_7.png", "c", "/m/01", "7"),  # missing mask
        ("d_m01_8.png", "d", "/m/01", "8"),  # missing image
    ]
    with open(root / "train-annotations-object-segmentation.csv", "w") as f:
        f.write("MaskPath,ImageID,LabelName,BoxID,BoxXMin,BoxXMax,BoxYMin,BoxYMax,")
        f.write("PredictedIoU,Clicks\n")
        for mask_path, image_id, label, box_id in rows:
            f.write(f"{mask_path},{image_id},{label},{box_id},0.1875,0.625,0.1667,0.5833,0.9,\n")
    with open(root / "long_captions_train.jsonl", "w") as f:
        f.write(json.dumps({"key": "c_5", "caption": "a small dog sitting"}) + "\n")
    return root, images, half


def test_openimages(openimages_source, tmp_path):
    root, images, half = openimages_source
    report = prepare.prepare("openimages_inpaint", str(tmp_path), str(root))
    assert report["train"]["written"] == 2
    assert report["train"]["skipped"] == {
        "unreadable_mask": 1, "unknown_label": 1, "corrupt_image": 1,
        "empty_mask": 1, "missing_mask": 1, "missing_image": 1,
    }  # fmt: skip
    assert report["train"]["samples"]["corrupt_image"] == ["b.jpg"]
    train = read_split(str(tmp_path), "openimages_inpaint", "train")
    assert set(train) == {"openimages/train/a_m01_1.png", "openimages/train/c_m02_5.png"}
    cat, dog = train["openimages/train/a_m01_1.png"], train["openimages/train/c_m02_5.png"]
    assert cat["image"] == images["a"] and records.text(dog["label"]) == "Dog"
    # masks come at a lower resolution: stored at it (the reference augments them there)
    np.testing.assert_array_equal(stored_mask(cat), half)
    np.testing.assert_allclose(cat["box"], [0.1667, 0.1875, 0.5833, 0.625], rtol=1e-6)
    assert records.text(dog["caption"]) == "a small dog sitting"


def test_openimages_short_rows_are_skipped(openimages_source, tmp_path, caplog):
    root = tmp_path / "openimages"
    shutil.copytree(openimages_source[0], root)
    with open(root / "train-annotations-object-segmentation.csv", "ab") as f:
        f.write(b"a_m01_1.png,a,/m/01,9\n")  # line 10: no box columns (its mask and image exist)
        f.write(b"c\n")  # line 11: one field
        f.write(b"a_m01_1.png,a,/m/01,10,0.1,0.6,0.1,0.5,0.9,\xff\n")  # line 12: not UTF-8
    with caplog.at_level(logging.WARNING):
        report = prepare.prepare("openimages_inpaint", str(tmp_path / "tfds"), str(root))
    assert report["train"]["written"] == 2
    assert report["train"]["skipped"]["bad_row"] == 3
    name = "train-annotations-object-segmentation.csv"
    samples = report["train"]["samples"]["bad_row"]
    assert [s.split(" ")[0] for s in samples] == [f"{name}:10", f"{name}:11", f"{name}:12"]
    assert f"{name}:10" in caplog.text


# ---- text-image pairs ----


def test_pairs(tmp_path):
    source = tmp_path / "pairs"
    os.makedirs(source / "img")
    jpeg(source / "img" / "0.jpg", 40, 30, 0)
    jpeg(source / "img" / "1.jpg", 30, 40, 1)
    jpeg(source / "img" / "bad.jpg", 30, 40, 2)
    truncate(source / "img" / "bad.jpg")
    lines = [
        json.dumps({"image": "img/0.jpg", "text": "a sunny beach"}),
        json.dumps({"image_name": "img/1.jpg", "caption": "two red chairs"}),
        json.dumps({"image": str(source / "img" / "0.jpg"), "text": "absolute path"}),
        "{not json",
        json.dumps({"image": "img/0.jpg"}),
        json.dumps({"image": "img/0.jpg", "text": "  "}),
        json.dumps({"image": "img/missing.jpg", "text": "gone"}),
        json.dumps({"image": "img/bad.jpg", "text": "broken"}),
    ]
    (source / "train.jsonl").write_text("\n".join(lines) + "\n")
    data_dir = str(tmp_path / "tfds")
    report = prepare.prepare("text_image_pairs", data_dir, str(source))
    assert report["train"]["written"] == 3
    assert report["train"]["skipped"] == {
        "bad_line": 2, "empty_text": 1, "missing_image": 1, "corrupt_image": 1
    }  # fmt: skip
    assert report["train"]["samples"]["corrupt_image"] == ["img/bad.jpg"]
    assert report["train"]["samples"]["bad_line"][0].startswith("train.jsonl:4")
    train = read_split(data_dir, "text_image_pairs", "train")
    texts = sorted(records.text(r["label"]) for r in train.values())
    assert texts == ["a sunny beach", "absolute path", "two red chairs"]
    for record in train.values():
        assert record["mask"] == records.NO_MASK
        np.testing.assert_array_equal(record["box"], np.zeros(4))
    assert prepare.prepare("text_image_pairs", data_dir, str(source)) == report  # reused


def pairs_source(root, texts):
    """A pairs folder with one image per text (distinct example ids)."""
    os.makedirs(root / "img", exist_ok=True)
    for i in range(len(texts)):
        jpeg(root / "img" / f"{i}.jpg", 40, 30, i)
    lines = [json.dumps({"image": f"img/{i}.jpg", "text": t}) for i, t in enumerate(texts)]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_pairs_undecodable_line_is_skipped(tmp_path, caplog):
    source = pairs_source(tmp_path / "pairs", ["a sunny beach", "two red chairs"])
    with open(source / "train.jsonl", "ab") as f:
        f.write(b'{"image": "img/0.jpg", "text": "caf\xe9"}\n')  # line 3: Latin-1, not UTF-8
        f.write(json.dumps({"image": "img/0.jpg", "text": "after"}).encode() + b"\n")
    with caplog.at_level(logging.WARNING):
        report = prepare.prepare("text_image_pairs", str(tmp_path / "tfds"), str(source))
    assert report["train"]["written"] == 3
    assert report["train"]["skipped"] == {"bad_line": 1}
    assert report["train"]["samples"]["bad_line"][0].startswith("train.jsonl:3 (")
    assert "train.jsonl:3" in caplog.text


def test_overwrite_keeps_the_old_dataset_until_the_new_one_is_built(tmp_path):
    source = pairs_source(tmp_path / "pairs", ["one", "two"])
    data_dir = str(tmp_path / "tfds")
    first = prepare.prepare("text_image_pairs", data_dir, str(source))
    assert first["train"]["written"] == 2
    pairs_source(source, ["one", "two", "three"])
    # without --overwrite a prepared dataset is reused as it is, not rebuilt
    assert prepare.prepare("text_image_pairs", data_dir, str(source)) == first
    assert len(read_split(data_dir, "text_image_pairs", "train")) == 2
    os.remove(source / "train.jsonl")  # the rebuild fails: no split file
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        prepare.prepare("text_image_pairs", data_dir, str(source), overwrite=True)
    assert len(read_split(data_dir, "text_image_pairs", "train")) == 2  # the old one, intact
    assert not [n for n in os.listdir(data_dir) if "catflax" in n]  # no staging folder left
    pairs_source(source, ["one", "two", "three"])
    again = prepare.prepare("text_image_pairs", data_dir, str(source), overwrite=True)
    assert again["train"]["written"] == 3
    assert len(read_split(data_dir, "text_image_pairs", "train")) == 3
    assert prepare.prepare("text_image_pairs", data_dir, str(source)) == again
    assert not [n for n in os.listdir(data_dir) if "catflax" in n]


def test_missing_source_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="instances_train2017.json"):
        os.makedirs(tmp_path / "empty" / "x")
        prepare.prepare("coco_inpaint", str(tmp_path / "tfds"), str(tmp_path / "empty"))


def test_command_line_errors_are_one_line(tmp_path):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="is empty"):  # TFDS's own check asserts
        prepare.prepare("coco_inpaint", str(tmp_path / "tfds"), str(tmp_path / "empty"))
    os.makedirs(tmp_path / "other" / "x")
    command = [sys.executable, "-m", "catflax.data.prepare", "--dataset=coco_inpaint"]
    command += [f"--source={tmp_path / 'other'}", f"--data_dir={tmp_path / 'tfds'}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("prepare: ") and "instances_train2017.json" in last


# ---- synthetic shapes ----


def test_synthetic_builder_matches_generator(tmp_path):
    import tensorflow_datasets as tfds

    from catflax.data import builders

    config = builders.SyntheticShapesConfig(name="t", num_train=6, num_validation=2, seed=3)
    builder = builders.SyntheticShapes(config=config, data_dir=str(tmp_path))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    assert builder.reports["train"].written == 6
    train = read_split(str(tmp_path), "synthetic_shapes/t", "train")
    for example_id, record in train.items():
        index = int(example_id.split("/")[-1])
        expected = synthetic.make_record(3, index, "train")
        assert record["image"] == expected["image"] and record["mask"] == expected["mask"]
        assert records.text(record["label"]) == expected["label"]


def test_synthetic_shapes_colours_and_determinism():
    for index in range(20):
        example = synthetic.render(7, index)
        again = synthetic.render(7, index)
        np.testing.assert_array_equal(example["image"], again["image"])
        image, mask = example["image"], example["mask"]
        assert example["label"].split()[-2:] == [example["colour"], example["shape"]]
        assert synthetic.prompt_colour(example["label"]) == example["colour"]
        assert synthetic.dominant_colour(image, mask) == example["colour"]
        assert synthetic.colour_fractions(image, mask)[example["colour"]] > 0.95
        outside = synthetic.colour_fractions(image, 255 - mask)
        assert max(outside.values()) < 0.01  # the background has no named colour
        np.testing.assert_array_equal(np.unique(mask), [0, 255])
    assert not np.array_equal(synthetic.render(7, 0)["image"], synthetic.render(8, 0)["image"])
    labels = {synthetic.render(0, i)["label"] for i in range(200)}
    assert len(labels) > 20 and {label.split()[-1] for label in labels} == set(synthetic.SHAPES)


def test_gcs_data_dir_reuses_a_prepared_dataset(fake_gcs, tmp_path, monkeypatch):
    """A gs:// data_dir (conftest's fake_gcs): built locally and copied up; a dataset prepared
    there is reused, --overwrite rebuilds it, and an interrupted copy leaves it not prepared."""
    data_dir, name = "gs://bucket/tfds", "text_image_pairs"
    on_store = fake_gcs / "bucket" / "tfds"  # read there: ArrayRecord reads local files only
    source = pairs_source(tmp_path / "pairs", ["one", "two"])
    first = prepare.prepare(name, data_dir, str(source))
    assert first["train"]["written"] == 2
    assert len(read_split(str(on_store), name, "train")) == 2
    pairs_source(source, ["one", "two", "three"])
    assert prepare.prepare(name, data_dir, str(source)) == first  # reused, not rebuilt
    os.remove(source / "train.jsonl")  # a failed rebuild: built locally, the bucket untouched
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        prepare.prepare(name, data_dir, str(source), overwrite=True)
    assert prepare.prepare(name, data_dir, str(source)) == first
    pairs_source(source, ["one", "two", "three"])

    def broken_upload(local_root, remote_root):
        raise OSError("connection reset")

    with monkeypatch.context() as m:
        m.setattr(paths, "copy_tree", broken_upload)
        with pytest.raises(OSError, match="connection reset"):
            prepare.prepare(name, data_dir, str(source), overwrite=True)
    assert not (on_store / name / "1.0.0" / prepare.PREPARED_MARKER).exists()
    again = prepare.prepare(name, data_dir, str(source))  # not prepared: built again
    assert again["train"]["written"] == 3
    assert len(read_split(str(on_store), name, "train")) == 3
    pairs_source(source, ["one", "two", "three", "four"])
    assert prepare.prepare(name, data_dir, str(source), overwrite=True)["train"]["written"] == 4
    assert len(read_split(str(on_store), name, "train")) == 4


def test_decode_errors_are_clear():
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(buffer, "JPEG")
    with pytest.raises(records.DecodeError, match="cannot decode image"):
        records.decode_image(buffer.getvalue()[:100])
    with pytest.raises(records.DecodeError, match="cannot decode image"):
        records.check_image(buffer.getvalue()[:300])
    with pytest.raises(records.DecodeError, match="cannot decode mask"):
        records.decode_mask(b"garbage")
