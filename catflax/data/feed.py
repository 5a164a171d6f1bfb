"""The trainer's view of the pipeline: global device batches, resumable state, skip counts.

`Feed` is what catflax.train.loop.run_stage's `data_factory(stage)` returns:
`next_global(mesh[, fill])`, `checkpointable()` (for grain's orbax handler) and `skipped()`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from catflax.data import pipeline
from catflax.tokenizer import tokenize

# What the jitted steps read; the rest (strings, soft masks, counters) stays on the host.
DEVICE_KEYS = ("image512", "masked512", "image224", "masked224", "mask64", "mask16", "input_ids")


class Feed:
    """Wraps a PipelineIterator; adds `empty_ids` (the tokenised "" prompt, (B, 77)) for
    classifier-free conditioning dropout."""

    def __init__(self, iterator: pipeline.PipelineIterator, keys=DEVICE_KEYS):
        self.iterator = iterator
        self.keys = tuple(keys)
        self._empty_ids: np.ndarray | None = None

    @classmethod
    def from_config(cls, config, mode: str = "train") -> Feed:
        """A feed over this process's shard of `config.data` (see pipeline.from_config); "eval"
        feeds also carry `valid` (False for the padding that evens out the last batch)."""
        keys = DEVICE_KEYS + (("valid",) if mode == "eval" else ())
        return cls(pipeline.make_iterator(pipeline.from_config(config, mode)), keys)

    def next_local(self) -> dict[str, np.ndarray]:
        """The next host-local batch, device keys only, plus empty_ids."""
        batch = next(self.iterator)
        missing = [k for k in self.keys if k not in batch]
        if missing:
            raise KeyError(f"batch has no {missing} (tokenize=False leaves out input_ids)")
        local = {k: batch[k] for k in self.keys}
        if "input_ids" in local:
            if self._empty_ids is None:
                tokenizer = pipeline.prompt_tokenizer(self.iterator.config.tokenizer_path)
                self._empty_ids = tokenize("", tokenizer)[0]
            local["empty_ids"] = np.broadcast_to(self._empty_ids, local["input_ids"].shape).copy()
        return local

    def next_global(self, mesh, fill: Mapping[str, int] | None = None) -> dict:
        """The next batch as global jax.Arrays, batch axis over the mesh's (data, fsdp); each
        `fill` key becomes one more int32 entry, this process's value for its every example."""
        from catflax import sharding

        local = self.next_local()
        examples = len(next(iter(local.values())))
        for key, value in (fill or {}).items():
            local[key] = np.full((examples,), value, np.int32)
        return sharding.global_batch(local, mesh)

    def checkpointable(self) -> pipeline.PipelineIterator:
        return self.iterator

    def skipped(self) -> int:
        """Records this process has skipped so far (all reasons; by reason: iterator.skipped)."""
        return sum(self.iterator.skipped.values())
