"""Metric writing: TensorBoard event files and a readable console line, from process 0 only."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging
from etils import epath

from catflax import paths

# Dense bf16 peak FLOP/s per JAX device, by `device_kind` substring (first match wins).
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
    ("A100", 312e12), ("B200", 2250e12),
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12),
    ("TPU v5", 459e12), ("TPU v6 lite", 918e12), ("TPU v6e", 918e12),
)  # fmt: skip


def peak_flops_per_device(configured: float = 0.0, device_kind: str | None = None) -> float:
    """`configured` where > 0, else the known bf16 peak of this device kind; 0 if unknown."""
    if configured > 0:
        return float(configured)
    kind = device_kind or jax.devices()[0].device_kind
    return next((peak for name, peak in PEAK_BF16_FLOPS if name in kind), 0.0)


class MetricWriter:
    """Scalars and images to TensorBoard (tensorboardX) plus a console line with ETA."""

    def __init__(
        self, logdir: str | os.PathLike, total_steps: int, stage: str, first_step: int = 0
    ):
        """`logdir` local or a URL (gs://); ETAs count from `first_step` (where a run resumed)."""
        self.enabled = jax.process_index() == 0
        self.total_steps, self.stage, self.first_step = total_steps, stage, first_step
        self.start = time.time()
        self.writer = None
        self.logdir = epath.Path(logdir)
        self.stage_dir = self.logdir.parent  # where the .jsonl records go
        # Object stores (gs://) cannot append: there the records are kept and rewritten, and
        # TensorBoard writes to a local folder whose files are copied over, by `flush` (the
        # loop calls it at every checkpoint: rows past the last one are redone on a resume)
        # and at close.
        self._remote = paths.is_remote(logdir)
        self._records: dict[str, list[str]] = {}
        if self.enabled:
            from tensorboardX import SummaryWriter

            local = tempfile.mkdtemp(prefix="catflax-tb-") if self._remote else str(logdir)
            # TensorBoard hides the earlier run's events past the resume step (redone now).
            self.writer = SummaryWriter(local, purge_step=first_step + 1)

    def record(self, step: int, values: Mapping[str, float], name: str = "metrics") -> None:
        """Appends a line to <stage>/<name>.jsonl: metrics.jsonl has one per step (the raw
        curve, for reports), validation.jsonl one per validation."""
        if not self.enabled:
            return
        line = json.dumps({"step": step, **values}) + "\n"
        path = self.stage_dir / f"{name}.jsonl"
        if name not in self._records:  # a resumed run: the earlier run's rows up to its resume
            # step come first; rows past it are redone now (they came after the checkpoint)
            kept = []
            if path.exists():
                kept = [row for row in path.read_text().splitlines(keepends=True)
                        if _step_of(row, path) <= self.first_step]  # fmt: skip
            self._records[name] = kept if self._remote else []
            if not self._remote:
                path.write_text("".join(kept))
        if not self._remote:
            with path.open("a") as f:
                f.write(line)
            return
        self._records[name].append(line)

    def flush(self) -> None:
        """Writes the kept records and TensorBoard files to a remote run directory (a local one
        has them already)."""
        if not (self._remote and self.enabled):
            return
        self.logdir.mkdir(parents=True, exist_ok=True)
        for name, lines in self._records.items():
            (self.stage_dir / f"{name}.jsonl").write_text("".join(lines))
        self.writer.flush()
        local = epath.Path(self.writer.logdir)
        for event_file in local.iterdir():
            (self.logdir / event_file.name).write_bytes(event_file.read_bytes())

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, float(value), step)
        done = step - self.first_step
        elapsed = time.time() - self.start
        eta = elapsed / max(done, 1) * (self.total_steps - step)
        shown = "  ".join(
            f"{k}={v:.4g}" for k, v in values.items() if k.startswith(("loss", "grad", "lr", "ex"))
        )
        bar = _bar(step / max(self.total_steps, 1))
        print(
            f"[{self.stage}] {bar} {step}/{self.total_steps}  {shown}  eta {eta:.0f}s", flush=True
        )

    def image(self, step: int, name: str, image_HWC: np.ndarray) -> None:
        if self.enabled:
            self.writer.add_image(name, np.asarray(image_HWC), step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.flush()


def _step_of(row: str, path) -> float:
    """The step of a .jsonl row; a row that does not parse (a write cut off) sorts last."""
    try:
        return json.loads(row)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        logging.warning("%s: dropped an unreadable row: %r", path, row[:80])
        return math.inf


def _bar(fraction: float, width: int = 20) -> str:
    filled = min(width, math.floor(fraction * width))
    return "[" + "#" * filled + "." * (width - filled) + "]"
