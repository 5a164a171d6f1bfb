"""Build a catflax dataset into a TFDS data_dir (ArrayRecord) and report what was skipped.

    python -m catflax.data.prepare --dataset=coco_inpaint --source=/data/coco --data_dir=DIR
    python -m catflax.data.prepare --dataset=synthetic_shapes --data_dir=DIR

`--dataset` is a TFDS name with an optional config (`coco_inpaint/all`). `--data_dir` may be a
`gs://` bucket: the dataset is then built in a local temporary folder and copied there (the copy
needs `gcsfs`). The counts are printed and saved as prepare_report.json beside the data.
A prepared dataset is reused; `--overwrite` rebuilds it in a temporary folder inside `--data_dir`
(a local one for gs://) and puts it in place only once the build succeeded, so a failed rebuild
leaves the old one as it was.
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
PREPARED_MARKER = "dataset_info.json"  # TFDS's is_prepared() looks for it in the version folder


def prepare(
    dataset: str, data_dir: str, source: str | None = None, overwrite: bool = False
) -> dict[str, dict]:
    """Builds `dataset` (unless already built; `overwrite` rebuilds it, keeping the old one until
    the new one is built; for gs:// see _prepare_remote) and returns per split {written,
    skipped, warnings, samples}; also written to prepare_report.json in the dataset's folder."""
    from catflax.data import builders

    name = dataset.split("/")[0]
    if name not in builders.BUILDERS:
        raise ValueError(f"--dataset={dataset!r}: expected one of {sorted(builders.BUILDERS)}")
    if name in NEEDS_SOURCE and not (source and os.path.isdir(source)):
        raise FileNotFoundError(f"--source={source!r}: {name} needs a local source folder")
    if name in NEEDS_SOURCE and not os.listdir(source):
        raise FileNotFoundError(f"--source={source!r} is empty: {name} reads its files from it")
    if paths.is_remote(data_dir):
        return _prepare_remote(dataset, data_dir, source, overwrite)
    return _prepare_local(dataset, os.path.expanduser(data_dir), source, overwrite)


def _prepare_remote(dataset: str, data_dir: str, source: str | None, overwrite: bool) -> dict:
    """prepare() into a gs:// data_dir: a dataset prepared there is reused (unless `overwrite`);
    else it is built in a local temporary folder, so a failed build leaves the bucket untouched,
    then copied up with TFDS's marker of a prepared dataset (dataset_info.json) last. A rebuild
    deletes the old marker before the copy: an interrupted copy leaves a dataset that reads as
    not prepared (and is built again by the next prepare), never old metadata over new files."""
    import tensorflow_datasets as tfds

    target = tfds.builder(dataset, data_dir=data_dir)
    if target.is_prepared() and not overwrite:
        return _prepared_report(target)
    build_dir = tempfile.mkdtemp(prefix="catflax-prepare-")
    try:
        local_root = os.path.join(build_dir, "data_dir")
        report = _prepare_local(dataset, local_root, source, overwrite=False)
        built = tfds.builder(dataset, data_dir=local_root).data_dir
        marker = os.path.join(build_dir, PREPARED_MARKER)  # held out of the copy until the end
        os.rename(os.path.join(built, PREPARED_MARKER), marker)
        remote_marker = target.data_path / PREPARED_MARKER
        remote_marker.unlink(missing_ok=True)
        paths.copy_tree(local_root, data_dir)
        with open(marker, "rb") as f:
            remote_marker.write_bytes(f.read())
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    return report


def _prepare_local(dataset: str, data_dir: str, source: str | None, overwrite: bool) -> dict:
    """prepare() into a local data_dir. A rebuild over an existing folder is built in a temporary
    folder inside data_dir and swapped in on success: a failed one leaves the old data as it was
    (TFDS's own overwrite deletes it first)."""
    import tensorflow_datasets as tfds

    target = tfds.builder(dataset, data_dir=data_dir)
    if target.is_prepared() and not overwrite:
        return _prepared_report(target)
    config = tfds.download.DownloadConfig(
        manual_dir=os.path.abspath(source) if source else None,
        try_download_gcs=False,
        download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
    )
    if not os.path.exists(target.data_dir):
        target.download_and_prepare(download_config=config)
        return _write_report(target)
    staging = tempfile.mkdtemp(prefix=".catflax-prepare-", dir=data_dir)
    try:
        builder = tfds.builder(dataset, data_dir=staging)
        builder.download_and_prepare(download_config=config)
        report = _write_report(builder)
        old = os.path.join(staging, "replaced")
        os.rename(target.data_dir, old)
        try:
            os.rename(builder.data_dir, target.data_dir)
        except OSError:
            os.rename(old, target.data_dir)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _prepared_report(builder) -> dict[str, dict]:
    """The saved report of a prepared dataset (written from TFDS's counts if there is none)."""
    report_path = epath.Path(builder.data_dir) / records.REPORT_FILE
    if report_path.exists():
        return json.loads(report_path.read_text())
    return _write_report(builder)


def _write_report(builder) -> dict[str, dict]:
    """The builder's per-split reports (with TFDS's example counts), saved in its folder."""
    report = {split: r.as_dict() for split, r in getattr(builder, "reports", {}).items()}
    for split, info in builder.info.splits.items():  # TFDS's own count is the truth
        report.setdefault(split, records.SplitReport().as_dict())["written"] = info.num_examples
    (epath.Path(builder.data_dir) / records.REPORT_FILE).write_text(json.dumps(report, indent=2))
    return report


def format_counts(report: dict[str, dict]) -> str:
    """The report as lines: per split, written, skipped and warnings by reason, with samples."""
    split_reports = {split: records.SplitReport.from_dict(r) for split, r in report.items()}
    return records.format_report(split_reports)


def main(argv) -> None:
    from absl import flags

    del argv
    flags_ = flags.FLAGS
    try:
        report = prepare(flags_.dataset, flags_.data_dir, flags_.source, flags_.overwrite)
    except (ValueError, OSError) as e:  # bad flags or sources (FileNotFoundError is an OSError)
        message = " ".join(str(e).split()) or type(e).__name__
        sys.exit(f"prepare: {message}")
    print(f"{flags_.dataset} in {flags_.data_dir}:")
    print(format_counts(report))
    sys.stdout.flush()


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("dataset", None, "TFDS name[/config], e.g. coco_inpaint", required=True)
    flags.DEFINE_string("source", None, "folder with the source files (see each builder)")
    flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "TFDS data_dir, local or gs://")
    flags.DEFINE_bool(
        "overwrite", False, "rebuild a prepared dataset (the old one stays until the new is built)"
    )
    app.run(main)
