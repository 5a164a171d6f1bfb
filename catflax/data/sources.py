"""Where pipeline records come from: prepared TFDS datasets, per-process shards, the mixture."""

from __future__ import annotations

import collections.abc
import math
import os
import sys

import grain
import numpy as np

from catflax import paths


def parse_mixture(spec: str) -> tuple[tuple[str, float], ...]:
    """Parses "coco_inpaint:0.8,text_image_pairs:0.2" into (("coco_inpaint", 0.8), ...); weight
    1 if left out. Names are TFDS names, optionally with a config ("coco_inpaint/all")."""
    mixture = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, weight = part.partition(":")
        try:
            value = float(weight) if weight else 1.0
        except ValueError as e:
            raise ValueError(f"mixture {spec!r}: weight of {name!r} is not a number") from e
        if value < 0:
            raise ValueError(f"mixture {spec!r}: negative weight for {name!r}")
        mixture.append((name.strip(), value))
    if not mixture or sum(w for _, w in mixture) <= 0:
        raise ValueError(f"mixture {spec!r}: no dataset with a positive weight")
    return tuple(mixture)


def open_tfds(name: str, split: str, data_dir: str, prepare_synthetic: bool = True):
    """The prepared ArrayRecord split of a catflax TFDS dataset as a random-access source.

    `synthetic_shapes` is generated here when missing (it needs no source files). In a
    multi-process run every process must call this (it holds a barrier): process 0 generates,
    the others wait, then read."""
    import tensorflow_datasets as tfds

    from catflax.data import builders  # registers the builders

    del builders
    data_dir = os.path.expanduser(data_dir) if data_dir else None
    synthetic = prepare_synthetic and name.split("/")[0] == "synthetic_shapes"
    if synthetic:
        _prepare_synthetic_once(name, data_dir)
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        if synthetic:  # one process, or a host that does not see process 0's filesystem
            builder = _prepare(name, data_dir)
        else:
            raise FileNotFoundError(
                f"dataset {name!r} is not prepared in {builder.data_dir}; run "
                f"python -m catflax.data.prepare --dataset={name} --source=DIR "
                f"--data_dir={data_dir or '~/tensorflow_datasets'}"
            )
    if split not in builder.info.splits:
        raise KeyError(
            f"dataset {name!r} has no split {split!r}; it has {list(builder.info.splits)}"
        )
    return builder.as_data_source(split)


def _prepare_synthetic_once(name: str, data_dir: str | None) -> None:
    """Generates a missing synthetic dataset on process 0 while the other processes wait.

    Were every process to generate it, they would race to rename their copy into the same
    directory; the loser died with FileExistsError while the others waited for it in the next
    collective, so a two-process run hung."""
    import jax

    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        _prepare(name, data_dir)
    # The same on every process, whatever each one found on disk: all reach this barrier.
    multihost_utils.sync_global_devices(f"catflax: {name} prepared")


def _prepare(name: str, data_dir: str | None):
    """Generates `name` if missing; tolerates a process on this host finishing it first. On an
    object store (gs://), builds on local disk and copies it up (TFDS's ArrayRecord writer
    writes local files only)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    if data_dir and paths.is_remote(data_dir):
        from catflax.data import prepare

        prepare.prepare(name, data_dir)
        return tfds.builder(name, data_dir=data_dir)
    try:
        builder.download_and_prepare()
    except FileExistsError:  # TFDS renames its finished copy into place; another was first
        builder = tfds.builder(name, data_dir=data_dir)
        if not builder.is_prepared():
            raise
    return builder


PADDING: dict = {}  # stands for a padding record (grain drops None elements)


class Shard(collections.abc.Sequence):
    """Records process_index, process_index + process_count, ... of a source; then PADDING up to
    `length` (so every process of an evaluation yields the same number of batches)."""

    def __init__(self, source, process_index: int, process_count: int, length: int | None = None):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        self.source = source
        self.process_index, self.process_count = process_index, process_count
        self.num_records = len(range(process_index, len(source), process_count))
        self.length = self.num_records if length is None else length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        if not 0 <= index < self.length:
            raise IndexError(index)
        if index >= self.num_records:
            return PADDING
        return self.source[self.process_index + index * self.process_count]


def padded_shard_length(num_records: int, process_count: int) -> int:
    """Shard length every process pads to: the largest shard."""
    return math.ceil(num_records / process_count)


class BlockMixture(grain.transforms.DatasetSelectionMap):
    """Mixes datasets with exact proportions per block of `block` elements, randomly ordered
    inside each block (seeded): a batch smaller than a block holds them only on average (as the
    reference's per-example draw). The mix is independent of how grain slices elements across
    worker processes."""

    def __init__(self, weights, lengths, seed: int, block: int = 1000, finite: bool = False):
        weights = np.asarray(weights, np.float64) / np.sum(weights)
        counts = np.floor(weights * block).astype(np.int64)
        remainders = weights * block - counts
        for i in np.argsort(-remainders)[: block - counts.sum()]:  # largest remainders
            counts[i] += 1
        self.counts, self.block, self.seed = counts, block, seed
        if finite:  # end when the first dataset runs out of whole blocks
            self.length = min(n // c for n, c in zip(lengths, counts) if c > 0) * block
        else:
            self.length = sys.maxsize
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.length

    def _block_order(self, block_index: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cached is None or self._cached[0] != block_index:
            rng = np.random.default_rng([self.seed, block_index])
            dataset = rng.permutation(np.repeat(np.arange(len(self.counts)), self.counts))
            rank = np.empty_like(dataset)
            for k in range(len(self.counts)):
                rank[dataset == k] = np.arange(self.counts[k])
            self._cached = (block_index, dataset, rank)
        return self._cached[1], self._cached[2]

    def __getitem__(self, index: int) -> tuple[int, int]:
        if index >= self.length:
            raise IndexError(index)
        block_index, position = divmod(index, self.block)
        dataset, rank = self._block_order(block_index)
        k = int(dataset[position])
        return k, int(block_index * self.counts[k] + rank[position])


def fold_seed(*values: int) -> int:
    """A 32-bit seed from several integers (pipeline seed, process, source, purpose)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1)[0])
