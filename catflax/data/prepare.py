"""Build a catflax dataset into a TFDS data_dir (ArrayRecord) and report what was skipped.

    python -m catflax.data.prepare --dataset=coco_inpaint --source=/data/coco --data_dir=DIR
    python -m catflax.data.prepare --dataset=synthetic_shapes --data_dir=DIR

`--dataset` is a TFDS name with an optional config (`coco_inpaint/all`). `--data_dir` may be a
`gs://` bucket: the dataset is then built in a local temporary folder and copied there (the copy
needs `gcsfs`). The counts are printed and saved as prepare_report.json beside the data.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

from etils import epath

from catflax import paths
from catflax.data import records

NEEDS_SOURCE = ("coco_inpaint", "openimages_inpaint", "text_image_pairs")


def prepare(
    dataset: str, data_dir: str, source: str | None = None, overwrite: bool = False
) -> dict[str, dict]:
    """Builds `dataset` (unless already built) and returns per split {written, skipped,
    samples}; also written to prepare_report.json in the dataset's folder."""
    import tensorflow_datasets as tfds

    from catflax.data import builders

    name = dataset.split("/")[0]
    if name not in builders.BUILDERS:
        raise ValueError(f"--dataset={dataset!r}: expected one of {sorted(builders.BUILDERS)}")
    if name in NEEDS_SOURCE and not (source and os.path.isdir(source)):
        raise FileNotFoundError(f"--source={source!r}: {name} needs a local source folder")
    remote = data_dir if paths.is_remote(data_dir) else None
    build_dir = tempfile.mkdtemp(prefix="catflax-prepare-") if remote else data_dir
    builder = tfds.builder(dataset, data_dir=os.path.expanduser(build_dir))
    mode = tfds.download.GenerateMode
    config = tfds.download.DownloadConfig(
        manual_dir=os.path.abspath(source) if source else None,
        try_download_gcs=False,
        download_mode=mode.REUSE_CACHE_IF_EXISTS if not overwrite else mode.FORCE_REDOWNLOAD,
    )
    was_prepared = builder.is_prepared() and not overwrite
    builder.download_and_prepare(download_config=config)
    report_path = epath.Path(builder.data_dir) / records.REPORT_FILE
    if was_prepared and report_path.exists():
        report = json.loads(report_path.read_text())
    else:
        report = {split: r.as_dict() for split, r in builder.reports.items()}
        for split, info in builder.info.splits.items():  # TFDS's own count is the truth
            report.setdefault(split, records.SplitReport().as_dict())["written"] = info.num_examples
        report_path.write_text(json.dumps(report, indent=2))
    if remote:
        paths.copy_tree(os.path.expanduser(build_dir), remote)
        shutil.rmtree(build_dir, ignore_errors=True)
    return report


def format_counts(report: dict[str, dict]) -> str:
    """The report as lines: per split, written and skipped by reason, with samples."""
    split_reports = {}
    for split, r in report.items():
        split_report = records.SplitReport(written=r["written"], samples=r.get("samples", {}))
        split_report.skipped.update(r.get("skipped", {}))
        split_reports[split] = split_report
    return records.format_report(split_reports)


def main(argv) -> None:
    from absl import flags

    del argv
    flags_ = flags.FLAGS
    report = prepare(flags_.dataset, flags_.data_dir, flags_.source, flags_.overwrite)
    print(f"{flags_.dataset} in {flags_.data_dir}:")
    print(format_counts(report))
    sys.stdout.flush()


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("dataset", None, "TFDS name[/config], e.g. coco_inpaint", required=True)
    flags.DEFINE_string("source", None, "folder with the source files (see each builder)")
    flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "TFDS data_dir, local or gs://")
    flags.DEFINE_bool("overwrite", False, "rebuild even if the dataset is already prepared")
    app.run(main)
