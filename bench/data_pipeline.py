"""Input pipeline throughput: examples/s of one worker at 512 px from JPEG, and where time goes.

    python bench/data_pipeline.py                      # one worker (this process)
    python bench/data_pipeline.py --workers=4          # also the full pipeline with 4 workers

Images are COCO-sized (480-640 px sides) JPEGs (quality 90) of the synthetic shapes with added
grain, so they decode about as slowly as photographs; each has an object mask.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

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
        mask = records.decode_mask(record["mask"], image.size)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--clip_resolution", type=int, default=224)
    parser.add_argument("--examples", type=int, default=64, help="distinct JPEGs")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=16, help="timed batches")
    parser.add_argument("--workers", type=int, default=0, help="also time N worker processes")
    args = parser.parse_args()

    data = jpeg_records(args.examples)
    mean_kb = np.mean([len(r["image"]) for r in data]) / 1024
    config = pipeline.PipelineConfig(
        resolution=args.resolution,
        clip_resolution=args.clip_resolution,
        batch_size=args.batch_size,
        num_workers=0,
        read_threads=1,
    )
    print(f"{args.examples} JPEGs, 480-640 px, {mean_kb:.0f} KiB mean; {args.resolution} px out")
    for stage, ms in per_stage(data[:32], config).items():
        print(f"  {stage:>12}: {ms:6.2f} ms/example")
    rate = examples_per_second(data, config, args.batches)
    print(f"one worker (1 thread, in process): {rate:.1f} examples/s")
    if args.workers:
        parallel = dataclasses.replace(config, num_workers=args.workers)
        rate = examples_per_second(data, parallel, args.batches)
        print(f"{args.workers} worker processes: {rate:.1f} examples/s")


if __name__ == "__main__":
    main()
