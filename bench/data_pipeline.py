"""Input pipeline throughput at 512 px from JPEG: ms per example by stage, examples/s of one
worker (and of N worker processes); prints one JSON line and a table.

    python bench/data_pipeline.py                      # one worker (this process)
    python bench/data_pipeline.py --workers=4          # also the full pipeline with 4 workers

Images are COCO-sized (480-640 px sides) JPEGs (quality 90) of the synthetic shapes with added
grain, so they decode about as slowly as photographs; each has an object mask.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from bench import common
from catflax.data import geometry, pipeline, records, synthetic
from catflax.tokenizer import load_tokenizer, tokenize


def jpeg_records(count: int, seed: int = 0) -> list[dict]:
    out = []
    rng = np.random.default_rng(seed)
    for index in range(count):
        example = synthetic.render(seed, index, min_size=480, max_size=640)
        noisy = example["image"] + rng.normal(0, 12, example["image"].shape)
        image = np.clip(noisy, 0, 255).astype(np.uint8)
        out.append(
            records.make_record(
                image=synthetic.encode_image(image, "jpeg"),
                label=example["label"],
                example_id=f"bench/{index}",
                mask=records.encode_png(example["mask"]),
                box=example["box"],
                caption=example["caption"],
            )
        )
    return out


def per_stage(data: list[dict], config: pipeline.PipelineConfig) -> dict[str, float]:
    """Milliseconds per example of each stage, run serially in this process."""
    rng = np.random.default_rng(0)
    tokenizer = load_tokenizer(config.tokenizer_path or None)
    tokenize("warm up", tokenizer)  # first call imports ftfy
    times = dict.fromkeys(["decode image", "decode mask", "geometry", "tokenize"], 0.0)
    for record in data:
        t0 = time.perf_counter()
        image = records.decode_image(record["image"])
        t1 = time.perf_counter()
        mask = records.decode_mask(record["mask"])  # at its own size, as the pipeline
        t2 = time.perf_counter()
        geometry.prepare_example(image, mask, record["box"], config.sizes, rng)
        t3 = time.perf_counter()
        tokenize(record["label"], tokenizer)
        t4 = time.perf_counter()
        for key, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[key] += seconds * 1e3 / len(data)
    return times


def examples_per_second(data, config, batches: int) -> float:
    iterator = pipeline.make_iterator(config, [data], 0, 1)
    next(iterator)  # start-up (worker processes, tokenizer) is not timed
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * config.batch_size / (time.perf_counter() - start)


def run(
    resolution: int = 512, clip_resolution: int = 224, examples: int = 64, batch_size: int = 8,
    batches: int = 16, workers: int = 0,
) -> dict:  # fmt: skip
    """Times the pipeline on generated JPEGs; prints the JSON line and tables; the record."""
    data = jpeg_records(examples)
    config = pipeline.PipelineConfig(
        resolution=resolution,
        clip_resolution=clip_resolution,
        batch_size=batch_size,
        num_workers=0,
        read_threads=1,
    )
    stages = per_stage(data[:32], config)
    rates = {"in process": examples_per_second(data, config, batches)}
    if workers:
        parallel = dataclasses.replace(config, num_workers=workers)
        rates[f"workers={workers}"] = examples_per_second(data, parallel, batches)
    record = dict(
        benchmark="data_pipeline", **common.machine(), cpu_count=os.cpu_count(),
        resolution=resolution, clip_resolution=clip_resolution, batch_size=batch_size,
        jpeg_kib_mean=float(np.mean([len(r["image"]) for r in data]) / 1024),
        ms_per_example=stages, examples_per_s=rates,
    )  # fmt: skip
    common.emit_json(record)
    kib = record["jpeg_kib_mean"]
    title = f"{examples} JPEGs (480-640 px, {kib:.0f} KiB mean) -> {resolution} px"
    rows = [{"stage": k, "ms/example": v} for k, v in stages.items()]
    common.print_table(rows, ["stage", "ms/example"], title=title)
    rows = [{"run": k, "examples/s": v} for k, v in rates.items()]
    common.print_table(rows, ["run", "examples/s"])
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--clip_resolution", type=int, default=224)
    parser.add_argument("--examples", type=int, default=64, help="distinct JPEGs")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=16, help="timed batches")
    parser.add_argument("--workers", type=int, default=0, help="also time N worker processes")
    args = parser.parse_args()
    run(**vars(args))


if __name__ == "__main__":
    main()
