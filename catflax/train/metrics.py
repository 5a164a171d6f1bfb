"""Metric writing: TensorBoard event files and a readable console line, from process 0 only."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping

import jax
import numpy as np


class MetricWriter:
    """Scalars and images to TensorBoard (tensorboardX) plus a console line with ETA."""

    def __init__(self, logdir: str, total_steps: int, stage: str):
        self.enabled = jax.process_index() == 0
        self.total_steps, self.stage = total_steps, stage
        self.start = time.time()
        self.writer = None
        self.stage_dir = os.path.dirname(logdir.rstrip("/"))  # where the .jsonl records go
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(logdir)

    def record(self, step: int, values: Mapping[str, float], name: str = "metrics") -> None:
        """Appends a line to <stage>/<name>.jsonl: metrics.jsonl has one per step (the raw
        curve, for reports), validation.jsonl one per validation."""
        if self.enabled:
            with open(os.path.join(self.stage_dir, f"{name}.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")

    def scalars(self, step: int, values: Mapping[str, float], first_step: int = 0) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, float(value), step)
        done = step - first_step
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


def _bar(fraction: float, width: int = 20) -> str:
    filled = min(width, math.floor(fraction * width))
    return "[" + "#" * filled + "." * (width - filled) + "]"
