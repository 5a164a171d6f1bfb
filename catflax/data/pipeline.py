"""The grain input pipeline: records -> SPEC.md §4 examples -> host-local numpy batches.

Per process (host): shard every source (`process_index::process_count`), shuffle per epoch,
mix the sources, decode and preprocess in worker processes, batch with fixed shapes. Bad records
(corrupt image, unreadable mask, mask empty after cropping) are skipped and counted: the counts
ride in each batch (`skipped_*`, summed over the examples) and accumulate in
`PipelineIterator.skipped`. In evaluation nothing is dropped: a bad or padding example has
`valid` False, so every process yields the same number of batches.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
from collections.abc import Sequence

import grain
import numpy as np
from absl import logging

from catflax.data import geometry, records, sources
from catflax.tokenizer import MAX_LENGTH, load_tokenizer, tokenize

SKIP_REASONS = ("corrupt_image", "unreadable_mask", "empty_mask")
LOGGED_SKIPS_PER_REASON = 5  # per worker: the first skipped records of each reason, by id
MAX_SKIPS_IN_A_ROW = 1000  # training stops on a source this bad rather than spin on it
NAMED_IN_ERROR = 5  # skipped records that error names
TEXT_KEYS = ("prompt", "example_id")  # object arrays of str: keep them off the device


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything the pipeline needs; `from_config` makes one from the run's ConfigDict."""

    mixture: tuple[tuple[str, float], ...] = (("synthetic_shapes", 1.0),)  # (TFDS name, weight)
    split: str = "train"
    mode: str = "train"  # "train": augment, random crops, endless; "eval": resize, one pass
    data_dir: str = ""  # TFDS data_dir ("" = TFDS default)
    resolution: int = 512  # image512 side; latents are resolution/8
    clip_resolution: int = 224  # image224 side
    patch_grid: int = 16  # mask16 side
    batch_size: int = 16  # per process
    seed: int = 0
    num_workers: int = 0  # grain worker processes (0 = in this process)
    prefetch: int = 2  # batches each worker keeps ready
    read_threads: int = 2  # threads decoding records inside each worker
    long_caption_prob: float = 0.2  # train: object examples use their long caption if any
    dilate_prob: float = 0.5  # train: dilate the mask, else use the box
    eval_crop: bool = False  # eval: centred crop around the mask instead of the plain resize
    tokenize: bool = True  # add input_ids (B, 77) int32
    tokenizer_path: str = ""  # "" = CLIP tokenizer built offline
    # train: None = endless (what the trainer uses; a finite count gives processes with unequal
    # shards unequal batch counts, so use it on one process only); eval always makes one pass
    num_epochs: int | None = None
    mixture_block: int = 1000  # mixture proportions are exact per this many examples

    def __post_init__(self):
        if self.mode not in ("train", "eval"):
            raise ValueError(f"mode={self.mode!r}: expected 'train' or 'eval'")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be positive")
        geometry.Sizes(self.resolution, self.clip_resolution, self.patch_grid)  # validates

    @property
    def sizes(self) -> geometry.Sizes:
        return geometry.Sizes(self.resolution, self.clip_resolution, self.patch_grid)


def from_config(config, mode: str, process_count: int | None = None) -> PipelineConfig:
    """PipelineConfig for "train" or "eval" from the run's ConfigDict (`config.data`, plus
    config.seed, config.train.batch_size (global) and config.weights.tokenizer)."""
    data, train = config.data, mode == "train"
    if train:
        processes = _process(0, process_count)[1]
        if config.train.batch_size % processes:
            raise ValueError(
                f"train.batch_size={config.train.batch_size} is not divisible by the "
                f"{processes} processes"
            )
        batch_size = config.train.batch_size // processes
    else:
        batch_size = data.eval_batch_size
    return PipelineConfig(
        mixture=sources.parse_mixture(data.train_mixture if train else data.eval_mixture),
        split=data.train_split if train else data.eval_split,
        mode=mode,
        data_dir=data.data_dir,
        resolution=data.resolution,
        clip_resolution=data.clip_resolution,
        patch_grid=data.patch_grid,
        batch_size=batch_size,
        seed=config.seed,
        num_workers=data.num_workers,
        prefetch=data.prefetch,
        read_threads=data.read_threads,
        long_caption_prob=data.long_caption_prob,
        dilate_prob=data.dilate_prob,
        eval_crop=data.eval_crop,
        tokenize=data.tokenize,
        tokenizer_path=config.weights.tokenizer,
    )


def batch_spec(config: PipelineConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every batch entry (host-local, leading axis = batch_size)."""
    b, r, c = config.batch_size, config.resolution, config.clip_resolution
    g, latent = config.patch_grid, config.sizes.latent
    spec = {
        "image512": ((b, r, r, 3), np.float32),  # [-1, 1]
        "masked512": ((b, r, r, 3), np.float32),  # masked pixels -1
        "image224": ((b, c, c, 3), np.uint8),
        "masked224": ((b, c, c, 3), np.uint8),  # masked pixels 127
        "mask512": ((b, r, r), np.uint8),  # soft 0..255
        "mask224": ((b, c, c), np.uint8),
        "mask64": ((b, latent, latent, 1), np.float32),  # {0, 1}
        "mask16": ((b, g, g), np.int32),  # {0, 1}
        "source": ((b,), np.int32),  # index into the mixture
        "valid": ((b,), np.bool_),  # False: padding or bad example (eval only)
        "prompt": ((b,), np.object_),
        "example_id": ((b,), np.object_),
    }
    spec.update({f"skipped_{reason}": ((b,), np.int32) for reason in SKIP_REASONS})
    if config.tokenize:
        spec["input_ids"] = ((b, MAX_LENGTH), np.int32)
    return {k: (shape, np.dtype(dtype)) for k, (shape, dtype) in spec.items()}


def device_arrays(batch: dict) -> dict[str, np.ndarray]:
    """The numeric entries of a batch (for jax.make_array_from_process_local_data)."""
    return {k: v for k, v in batch.items() if k not in TEXT_KEYS}


def skip_counts(batch: dict) -> dict[str, int]:
    """Records skipped (by reason) on the way to this host-local batch."""
    return {reason: int(np.sum(batch[f"skipped_{reason}"])) for reason in SKIP_REASONS}


# ---- one example ----


class ExampleTransform:
    """(source index, record) -> example dict; picklable for grain worker processes."""

    def __init__(self, config: PipelineConfig):
        self.config = config

    def __call__(self, element, rng: np.random.Generator | None = None) -> dict:
        source, record = element
        if not record:  # eval padding (sources.PADDING)
            return self._placeholder(source, None, "")
        if self.config.mode == "eval":
            rng = None
        example_id = records.text(record["example_id"])
        try:
            image = records.decode_image(record["image"])
        except records.DecodeError:
            return self._placeholder(source, "corrupt_image", example_id)
        has_object = len(record["mask"]) > 0
        if has_object:
            try:
                mask = records.decode_mask(record["mask"])
            except records.DecodeError:
                return self._placeholder(source, "unreadable_mask", example_id)
        else:
            mask = np.zeros((image.size[1], image.size[0]), np.uint8)
        prompt = records.text(record["label"])
        caption = records.text(record["caption"])
        use_caption = rng is not None and rng.random() < self.config.long_caption_prob
        if use_caption and has_object and caption:
            prompt = caption
        example = geometry.prepare_example(
            image,
            mask,
            np.asarray(record["box"], np.float32),
            self.config.sizes,
            rng,
            augment=has_object,
            dilate_prob=self.config.dilate_prob,
            eval_crop=self.config.eval_crop,
        )
        if has_object and (not example["mask16"].any() or not example["mask64"].any()):
            return self._placeholder(source, "empty_mask", example_id)
        return self._finish(example, source, prompt, example_id, valid=True, skipped=None)

    def _finish(self, example, source, prompt, example_id, valid, skipped) -> dict:
        example["source"] = np.int32(source)
        example["valid"] = np.bool_(valid)
        example["prompt"] = np.asarray(prompt, dtype=object)
        example["example_id"] = np.asarray(example_id, dtype=object)
        for reason in SKIP_REASONS:
            example[f"skipped_{reason}"] = np.int32(reason == skipped)
        if self.config.tokenize:
            example["input_ids"] = tokenize(prompt, prompt_tokenizer(self.config.tokenizer_path))[0]
        return example

    def _placeholder(self, source: int, reason: str | None, example_id: str) -> dict:
        """Train: a marker the skip stage drops and counts. Eval: zeros with valid False."""
        if self.config.mode == "train":
            return {"skip": reason, "example_id": example_id}
        spec = batch_spec(dataclasses.replace(self.config, batch_size=1))
        example = {
            k: np.zeros(shape[1:], dtype)
            for k, (shape, dtype) in spec.items()
            if dtype != np.object_ and not k.startswith("skipped_") and k != "input_ids"
        }
        example["image512"] -= 1.0  # a black image, as masked512 of a fully masked one
        example["masked512"] -= 1.0
        return self._finish(example, source, "", example_id, valid=False, skipped=reason)


_TOKENIZER_LOCK = threading.Lock()


def prompt_tokenizer(path: str = ""):
    """The CLIP tokenizer, loaded once per process (grain's read threads share it)."""
    with _TOKENIZER_LOCK:  # transformers' lazy imports are not thread-safe
        return load_tokenizer(path or None)


class _Tag:
    """record -> (source index, record)."""

    def __init__(self, source: int):
        self.source = source

    def __call__(self, record):
        return self.source, record


# ---- skipping, counted ----


class _DropSkippedDataset(grain.IterDataset):
    """Drops skip markers and adds their counts, by reason, to the next example."""

    def __iter__(self):
        return _DropSkippedIterator(self._parent.__iter__())


class _DropSkippedIterator(grain.DatasetIterator):
    """Logs the first few skipped records of each reason by id; stops a source of bad data
    (MAX_SKIPS_IN_A_ROW records in a row skipped) instead of looking for a good one forever."""

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self._logged = dict.fromkeys(SKIP_REASONS, 0)

    def __next__(self) -> dict:
        pending = dict.fromkeys(SKIP_REASONS, 0)
        examples: list[str] = []
        while True:
            example = next(self._parent)
            if "skip" not in example:
                break
            reason, example_id = example["skip"], example["example_id"]
            pending[reason] += 1
            if len(examples) < NAMED_IN_ERROR:
                examples.append(f"{example_id} ({reason})")
            if self._logged[reason] < LOGGED_SKIPS_PER_REASON:
                self._logged[reason] += 1
                more = self._logged[reason] == LOGGED_SKIPS_PER_REASON
                logging.warning("data: skipped %s: %s%s", example_id, reason,
                                " (further ones are only counted)" if more else "")  # fmt: skip
            if sum(pending.values()) >= MAX_SKIPS_IN_A_ROW:
                counts = {r: c for r, c in pending.items() if c}
                raise ValueError(
                    f"the training data gave {MAX_SKIPS_IN_A_ROW} records in a row that were all "
                    f"skipped ({counts}; e.g. {examples}): "
                    "check data.data_dir, the mixture, and masks that vanish at data.resolution"
                )
        for reason, count in pending.items():
            example[f"skipped_{reason}"] = np.int32(count)
        return example

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


class PipelineIterator(grain.DatasetIterator):
    """Yields batches; `skipped` totals the skip counts seen so far. Its state (get_state /
    set_state, JSON-able; grain.checkpoint handlers accept it) resumes at the next batch."""

    def __init__(self, parent: grain.DatasetIterator, config: PipelineConfig):
        super().__init__(parent)
        self.config = config
        self.skipped = dict.fromkeys(SKIP_REASONS, 0)

    def __next__(self) -> dict:
        batch = next(self._parent)
        for reason, count in skip_counts(batch).items():
            self.skipped[reason] += count
        return batch

    def get_state(self) -> dict:
        return {"pipeline": self._parent.get_state(), "skipped": dict(self.skipped)}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["pipeline"])
        self.skipped = {reason: int(state["skipped"].get(reason, 0)) for reason in SKIP_REASONS}


# ---- the pipeline ----


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return process_index, process_count


def make_dataset(
    config: PipelineConfig,
    data_sources: Sequence | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """The batched grain dataset of this process. `data_sources` (one random-access sequence of
    records per mixture entry) replaces the TFDS datasets, for tests; the process index and
    count default to jax.process_index() / jax.process_count()."""
    index, count = _process(process_index, process_count)
    if data_sources is None:
        data_sources = [
            sources.open_tfds(name, config.split, config.data_dir) for name, _ in config.mixture
        ]
    if len(data_sources) != len(config.mixture):
        raise ValueError(f"{len(data_sources)} sources for a mixture of {len(config.mixture)}")
    for (name, _), source in zip(config.mixture, data_sources):
        if len(source) < count:
            raise ValueError(f"{name}: {len(source)} records cannot feed {count} processes")
    transform = ExampleTransform(config)
    if config.mode == "train":
        ds = _train_records(config, data_sources, index, count)
        ds = ds.random_map(transform, seed=sources.fold_seed(config.seed, index, 1))
        read = grain.ReadOptions(
            num_threads=config.read_threads,
            prefetch_buffer_size=config.prefetch * config.batch_size,
        )
        ds = _DropSkippedDataset(ds.to_iter_dataset(read))
        ds = ds.batch(config.batch_size, drop_remainder=True)
    else:  # whole batches before the workers split the work: each worker gets whole batches
        ds = _eval_records(config, data_sources, index, count).map(transform)
        ds = ds.batch(config.batch_size)  # the records are padded to whole batches
        read = grain.ReadOptions(  # elements are batches: keep every read thread busy
            num_threads=config.read_threads,
            prefetch_buffer_size=max(config.prefetch, config.read_threads),
        )
        ds = ds.to_iter_dataset(read)
    if config.num_workers > 0:
        _absl_flags_ready()
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=config.num_workers, per_worker_buffer_size=config.prefetch
            ),
            worker_init_fn=_ignore_sigterm,
        )
    return ds


def _train_records(config, data_sources, index, count) -> grain.MapDataset:
    """Per source: this process's shard, shuffled per epoch, repeated; then mixed."""
    parts = []
    for k, source in enumerate(data_sources):
        ds = grain.MapDataset.source(sources.Shard(source, index, count))
        ds = ds.shuffle(seed=sources.fold_seed(config.seed, index, k, 0))
        parts.append(ds.repeat(config.num_epochs).map(_Tag(k)))
    if len(parts) == 1:
        return parts[0]
    mixture = sources.BlockMixture(
        [w for _, w in config.mixture],
        [len(p) for p in parts],
        seed=sources.fold_seed(config.seed, index, 2),
        block=config.mixture_block,
        finite=config.num_epochs is not None,
    )
    return grain.MapDataset.select_from_datasets(parts, mixture)


def _eval_records(config, data_sources, index, count) -> grain.MapDataset:
    """Every source once, this process's shard padded to the largest shard, then to whole
    batches: the same number of batches on every process."""
    parts = []
    for k, source in enumerate(data_sources):
        length = sources.padded_shard_length(len(source), count)
        parts.append(grain.MapDataset.source(sources.Shard(source, index, count, length)))
        parts[-1] = parts[-1].map(_Tag(k))
    total = sum(len(p) for p in parts)
    padding = math.ceil(total / config.batch_size) * config.batch_size - total
    if padding:
        parts.append(grain.MapDataset.source([sources.PADDING] * padding).map(_Tag(0)))
    return grain.MapDataset.concatenate(parts)


def make_iterator(
    config: PipelineConfig,
    data_sources: Sequence | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> PipelineIterator:
    """An iterator over this process's batches (see `batch_spec`), with a resumable state."""
    dataset = make_dataset(config, data_sources, process_index, process_count)
    return PipelineIterator(dataset.__iter__(), config)


def _ignore_sigterm(worker_index: int, worker_count: int) -> None:
    """In each grain worker: a preemption notice (SIGTERM to the whole process group: Slurm,
    GCE, `launch/tpu/stop.sh`) is the trainer's to handle; workers that died on it would end
    the input before the trainer reaches its checkpoint. grain stops them with the iterator."""
    del worker_index, worker_count
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _absl_flags_ready() -> None:
    """grain's worker processes read absl flags; outside an absl app, use their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
