"""Preemption notices (SIGTERM) for the whole training run, and a host-side sum over processes.

A notice sets a flag; nothing stops at once. Inside a stage's step loop the flag goes into every
batch (steps.PREEMPT_KEY) and the step's max of it tells every process, at the same step, to
checkpoint and exit 0. Before a stage starts, and after one ends, the processes sum their flags
(`agreed`) and all stop there if any was set. A notice during a stage's start-up (model build,
restore, compilation) reaches the first batches built after it. A process that stopped alone
would leave the others waiting in a collective. The handler replaces jax's own preemption
notifier, whose agreed step ids orbax's CheckpointManager would otherwise also feed."""

from __future__ import annotations

import signal

import jax
import numpy as np
from jax.experimental import multihost_utils


def sum_over_processes(count: int) -> int:
    """A per-process count summed over all processes (every process must call it)."""
    if jax.process_count() == 1:
        return count
    counts = multihost_utils.process_allgather(np.asarray(count, np.int64))
    return int(np.sum(counts))


class PreemptionNotice:
    """Catches SIGTERM from `__enter__` to `__exit__` (then the previous handler is back).

    `requested`: this process got a notice. `agreed()`: some process did (a collective: every
    process must call it at the same point)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> PreemptionNotice:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> bool:
        return sum_over_processes(int(self.requested)) > 0
