"""The grain pipeline: batch layout, SPEC.md §4 invariants, skips, mixture, resume, shards."""

import dataclasses
import io
import json
import os
import signal
import time

import numpy as np
import pytest
from PIL import Image

from catflax.data import pipeline, records, synthetic
from catflax.tokenizer import tokenize

SMALL = pipeline.PipelineConfig(resolution=64, clip_resolution=32, batch_size=4, seed=5)


def shapes(count, seed=0):
    return [synthetic.make_record(seed, i, min_size=64, max_size=96) for i in range(count)]


def pair_records(count):
    out = []
    for i in range(count):
        image = synthetic.render(99, i)["image"]
        out.append(
            records.make_record(synthetic.encode_image(image), f"pair text {i}", f"pair/{i}")
        )
    return out


def bad_records():
    good = synthetic.make_record(1, 0)
    corrupt = dict(good, image=good["image"][: len(good["image"]) // 3], example_id="bad/image")
    unreadable = dict(good, mask=b"\x89PNG broken", example_id="bad/mask")
    no_mask = records.encode_png(np.zeros_like(synthetic.render(1, 0)["mask"]))
    empty = dict(good, mask=no_mask, box=np.zeros(4, np.float32), example_id="bad/empty")
    # A 1-pixel object in a 1000x500 image: after the short side goes to 64 it is gone.
    buffer = io.BytesIO()
    Image.new("RGB", (1000, 500), (90, 90, 90)).save(buffer, "PNG")
    dot = np.zeros((500, 1000), np.uint8)
    dot[250, 500] = 255
    vanishing = records.make_record(
        buffer.getvalue(), "dot", "bad/vanishing", records.encode_png(dot), [0.5, 0.5, 0.502, 0.501]
    )
    return [corrupt, unreadable, empty, dict(vanishing, box=np.zeros(4, np.float32))]


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batch_layout_and_invariants(mode):
    config = dataclasses.replace(SMALL, mode=mode, long_caption_prob=0.0)
    batches = take(pipeline.make_iterator(config, [shapes(12)], 0, 1), 3)
    spec = pipeline.batch_spec(config)
    for batch in batches:
        assert batch.keys() == spec.keys()
        for key, (shape, dtype) in spec.items():
            assert batch[key].shape == shape and batch[key].dtype == dtype, key
        m512, m224 = batch["mask512"], batch["mask224"]
        assert (batch["masked512"][m512 == 255] == -1).all()
        np.testing.assert_array_equal(batch["masked512"][m512 == 0], batch["image512"][m512 == 0])
        assert (batch["masked224"][m224 == 255] == 127).all()
        np.testing.assert_array_equal(batch["masked224"][m224 == 0], batch["image224"][m224 == 0])
        patches = (m224 >= 128).reshape(4, 16, 2, 16, 2).any(axis=(2, 4))
        np.testing.assert_array_equal(batch["mask16"], patches)
        soft64 = np.stack([np.asarray(Image.fromarray(m).resize((8, 8))) / 255.0 for m in m512])
        expected64 = soft64 > 0 if mode == "train" else soft64 >= 0.5
        np.testing.assert_array_equal(batch["mask64"][..., 0], expected64)
        assert np.abs(batch["image512"]).max() <= 1.0
        assert batch["valid"].all() and (batch["source"] == 0).all()
        for prompt in batch["prompt"]:
            assert synthetic.prompt_colour(prompt) is not None  # "a red circle"
        np.testing.assert_array_equal(batch["input_ids"], tokenize(list(batch["prompt"])))
        for key in pipeline.SKIP_REASONS:
            assert not batch[f"skipped_{key}"].any()
        assert set(pipeline.device_arrays(batch)) == set(spec) - {"prompt", "example_id"}


def test_train_masks_cover_the_shape_and_colour():
    """Synthetic shapes fit in the crop: the (augmented) mask holds the prompted colour."""
    config = dataclasses.replace(SMALL, long_caption_prob=0.0, dilate_prob=1.0, batch_size=8)
    batch = next(pipeline.make_iterator(config, [shapes(8)], 0, 1))
    for image512, mask, prompt in zip(batch["image512"], batch["mask512"], batch["prompt"]):
        image = np.rint((image512 + 1) * 127.5).astype(np.uint8)
        assert synthetic.dominant_colour(image, mask) == synthetic.prompt_colour(prompt)


def test_eval_is_deterministic_and_seed_free():
    data = shapes(10)
    config = dataclasses.replace(SMALL, mode="eval", batch_size=4)
    first = list(pipeline.make_iterator(config, [data], 0, 1))
    again = list(pipeline.make_iterator(dataclasses.replace(config, seed=123), [data], 0, 1))
    assert len(first) == 3  # 10 examples + 2 padding
    for a, b in zip(first, again):
        assert_batches_equal(a, b)
    assert first[-1]["valid"].tolist() == [True, True, False, False]
    ids = [i for b in first for i, v in zip(b["example_id"], b["valid"]) if v]
    assert ids == [records.text(r["example_id"]) for r in data]  # in order
    # Worker processes get whole batches: the same batches, nothing dropped (each worker used
    # to batch its own share of the examples and drop its remainder).
    in_process = dataclasses.replace(config, tokenize=False)
    workers = dataclasses.replace(in_process, num_workers=2)
    expected = list(pipeline.make_iterator(in_process, [data], 0, 1))
    got = list(pipeline.make_iterator(workers, [data], 0, 1))
    assert len(got) == len(expected) == 3
    for a, b in zip(expected, got):
        assert_batches_equal(a, b)
    train = take(pipeline.make_iterator(SMALL, [data], 0, 1), 1)[0]
    train_again = take(pipeline.make_iterator(SMALL, [data], 0, 1), 1)[0]
    assert_batches_equal(train, train_again)  # training is deterministic from its seed too


def test_bad_records_are_skipped_and_counted():
    data = shapes(6) + bad_records()
    config = dataclasses.replace(SMALL, batch_size=2)
    iterator = pipeline.make_iterator(config, [data], 0, 1)
    batches = take(iterator, 30)  # exactly 10 epochs of the 6 good records
    ids = [i for b in batches for i in b["example_id"]]
    assert not any(i.startswith("bad/") for i in ids) and len(set(ids)) == 6
    # A skip is counted with the next good example: all of 9 epochs, part of the 10th.
    skipped = iterator.skipped
    assert 9 <= skipped["corrupt_image"] <= 10 and 9 <= skipped["unreadable_mask"] <= 10
    assert 18 <= skipped["empty_mask"] <= 20  # the empty mask and the vanishing dot
    summed = {r: sum(pipeline.skip_counts(b)[r] for b in batches) for r in pipeline.SKIP_REASONS}
    assert summed == skipped

    # Nothing but bad records: an error that names them, not an endless search for a good one.
    only_bad = pipeline.make_iterator(config, [bad_records()], 0, 1)
    with pytest.raises(ValueError, match=r"records in a row that were all skipped.*bad/image"):
        next(only_bad)

    config = dataclasses.replace(config, mode="eval")
    batches = list(pipeline.make_iterator(config, [data], 0, 1))
    flags = {i: v for b in batches for i, v in zip(b["example_id"], b["valid"])}
    assert [i for i, v in flags.items() if not v] == [
        "bad/image", "bad/mask", "bad/empty", "bad/vanishing"
    ]  # fmt: skip
    total = {r: sum(int(b[f"skipped_{r}"].sum()) for b in batches) for r in pipeline.SKIP_REASONS}
    assert total == {"corrupt_image": 1, "unreadable_mask": 1, "empty_mask": 2}


def test_long_captions_and_pairs():
    objects, pairs = shapes(8), pair_records(8)
    config = dataclasses.replace(
        SMALL, mixture=(("objects", 0.5), ("pairs", 0.5)), batch_size=8, long_caption_prob=1.0
    )
    batch = next(pipeline.make_iterator(config, [objects, pairs], 0, 1))
    captions = {r["caption"] for r in objects}
    for source, prompt, mask, image, masked in zip(
        batch["source"], batch["prompt"], batch["mask512"], batch["image512"], batch["masked512"]
    ):
        if source == 0:
            assert prompt in captions and mask.max() == 255
        else:
            assert prompt.startswith("pair text") and not mask.any()
            np.testing.assert_array_equal(image, masked)  # empty mask: nothing hidden
    never = dataclasses.replace(config, long_caption_prob=0.0)
    batch = next(pipeline.make_iterator(never, [objects, pairs], 0, 1))
    assert not set(batch["prompt"]) & captions
    evaluation = dataclasses.replace(config, mode="eval", mixture=(("objects", 1.0),))
    batch = next(pipeline.make_iterator(evaluation, [objects], 0, 1))
    assert not set(batch["prompt"]) & captions  # evaluation always uses the label


def test_mixture_proportions_are_exact_per_block():
    config = dataclasses.replace(
        SMALL, mixture=(("a", 0.75), ("b", 0.25)), batch_size=8, mixture_block=8
    )
    iterator = pipeline.make_iterator(config, [shapes(10), pair_records(5)], 0, 1)
    for batch in take(iterator, 6):
        assert (batch["source"] == 0).sum() == 6
    first = next(pipeline.make_iterator(config, [shapes(10), pair_records(5)], 0, 1))
    assert first["source"].tolist() != sorted(first["source"].tolist())  # shuffled in a block


def test_resume_gives_the_same_batches():
    data = shapes(9) + bad_records()[:1]
    config = dataclasses.replace(SMALL, batch_size=3)
    iterator = pipeline.make_iterator(config, [data], 0, 1)
    take(iterator, 5)
    state = json.loads(json.dumps(iterator.get_state()))  # as grain's orbax handler saves it
    expected = take(iterator, 5)
    restored = pipeline.make_iterator(config, [data], 0, 1)
    restored.set_state(state)
    for a, b in zip(expected, take(restored, 5)):
        assert_batches_equal(a, b)
    assert restored.skipped == iterator.skipped and iterator.skipped["corrupt_image"] >= 1


def test_process_shards_are_disjoint_and_cover():
    data = shapes(11)
    every = {records.text(r["example_id"]) for r in data}
    for mode in ("eval", "train"):
        config = dataclasses.replace(SMALL, mode=mode, batch_size=2, num_epochs=1)
        shards = []
        for process in (0, 1):
            batches = list(pipeline.make_iterator(config, [data], process, 2))
            if mode == "eval":
                assert len(batches) == 3  # both processes: 6 slots for 6 and 5 records
            ids = [i for b in batches for i, v in zip(b["example_id"], b["valid"]) if v]
            assert len(ids) == len(set(ids))
            shards.append(set(ids))
        assert not shards[0] & shards[1]
        if mode == "eval":
            assert shards[0] | shards[1] == every
        else:  # an epoch of whole batches: 6 -> 6, 5 -> 4 (drop_remainder)
            assert len(shards[0]) == 6 and len(shards[1]) == 4


def _children() -> set[int]:
    """Process ids of this process's children (Linux /proc)."""
    pids = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids.update(int(p) for p in f.read().split())
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
    return pids


def _state(pid: int) -> str | None:
    """A process's state letter from /proc (Z: a zombie, killed and not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def test_tfds_source_with_worker_processes_and_resume(tmp_path):
    data_dir = str(tmp_path)  # synthetic_shapes is generated on first use
    config = dataclasses.replace(  # tokenising in workers is tested above; it costs 1 s a worker
        SMALL,
        mixture=(("synthetic_shapes/tiny", 1.0),),
        data_dir=data_dir,
        num_workers=2,
        tokenize=False,
    )
    before = _children()
    iterator = pipeline.make_iterator(config, process_index=0, process_count=1)
    take(iterator, 5)
    workers = sorted(_children() - before)
    assert len(workers) >= 2
    for pid in workers:  # a preemption notice reaches the whole process group
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.5)
    alive = [pid for pid in workers if _state(pid) not in ("Z", "X", None)]  # not dead/zombie
    assert alive == sorted(workers)  # they ignore it: the trainer checkpoints first
    take(iterator, 5)
    state = iterator.get_state()
    expected = take(iterator, 5)
    restored = pipeline.make_iterator(config, process_index=0, process_count=1)
    restored.set_state(state)
    for a, b in zip(expected, take(restored, 5)):
        assert_batches_equal(a, b)
    assert expected[0]["image512"].shape == (4, 64, 64, 3)
    with pytest.raises(FileNotFoundError, match="catflax.data.prepare --dataset=coco_inpaint"):
        missing = dataclasses.replace(config, mixture=(("coco_inpaint", 1.0),), num_workers=0)
        pipeline.make_iterator(missing, process_index=0, process_count=1)


def test_from_config_reads_the_run_config():
    from configs import base, demo

    config = demo.get_config()
    train = pipeline.from_config(config, "train", process_count=2)
    assert train.mixture == (("synthetic_shapes", 1.0),) and train.resolution == 64
    assert train.clip_resolution == config.model.clip_vision.image_size == 64
    assert train.patch_grid == 16 and train.batch_size == config.train.batch_size // 2
    full = base.get_config()
    evaluation = pipeline.from_config(full, "eval")
    sizes = evaluation.sizes
    assert (sizes.resolution, sizes.clip_resolution, sizes.patch_grid) == (512, 224, 16)
    assert evaluation.mode == "eval" and evaluation.batch_size == full.data.eval_batch_size
    assert pipeline.from_config(full, "train", 1).mixture == (
        ("openimages_inpaint", 0.8), ("text_image_pairs", 0.2)
    )  # fmt: skip
    with pytest.raises(ValueError, match="not divisible"):
        pipeline.from_config(full, "train", process_count=3)


def test_feed_gives_sharded_global_batches_and_checkpoints(tmp_path):
    import jax
    from etils import epath
    from grain.checkpoint import CheckpointHandler

    from catflax import sharding
    from catflax.data import feed

    data = shapes(12)
    config = dataclasses.replace(SMALL, batch_size=8)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 1})
    train_feed = feed.Feed(pipeline.make_iterator(config, [data], 0, 1))
    batch = train_feed.next_global(mesh)
    assert set(batch) == set(feed.DEVICE_KEYS) | {"empty_ids"}
    assert batch["image512"].shape == (8, 64, 64, 3) and batch["mask64"].shape == (8, 8, 8, 1)
    assert batch["mask16"].sharding.spec[0] == ("data", "fsdp")
    assert len(batch["input_ids"].sharding.device_set) == jax.device_count()
    np.testing.assert_array_equal(np.asarray(batch["empty_ids"]), np.tile(tokenize(""), (8, 1)))
    assert train_feed.skipped() == 0

    handler = CheckpointHandler()  # what catflax.train.checkpoint saves through orbax
    handler.save(epath.Path(tmp_path), item=train_feed.checkpointable())
    expected = train_feed.next_local()
    restored = pipeline.make_iterator(config, [data], 0, 1)
    handler.restore(epath.Path(tmp_path), item=restored)
    assert_batches_equal(feed.Feed(restored).next_local(), expected)
