"""TFDS builders for the four catflax datasets: ArrayRecord files, no TensorFlow needed.

Importing this module registers `coco_inpaint`, `openimages_inpaint`, `text_image_pairs` and
`synthetic_shapes` with TFDS. Build with `python -m catflax.data.prepare` (or
`builder.download_and_prepare()` with a `manual_dir`), read with `builder.as_data_source(split)`.
Every builder fills `builder.reports[split]` (written / skipped and why) while it generates.
"""

from __future__ import annotations

import dataclasses
import inspect
import os

import tensorflow_datasets as tfds
from etils import epath

from catflax.data import coco, openimages, pairs, records, synthetic

FILE_FORMAT = "array_record"


class _ReportingBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Common parts: the shared features, and per-split build reports."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}  # noqa: RUF012 (TFDS class attribute)
    HOMEPAGE = ""

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", FILE_FORMAT)
        super().__init__(**kwargs)
        self.reports: dict[str, records.SplitReport] = {}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's own lookup needs the `importlib_resources` backport for packages installed in
        # editable mode; the defining file is what it is after.
        return epath.Path(inspect.getfile(cls))

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(self.__doc__ or "").strip(),
            features=records.features(),
            homepage=self.HOMEPAGE,
        )

    def _report(self, split: str) -> records.SplitReport:
        self.reports[split] = records.SplitReport()
        return self.reports[split]

    @staticmethod
    def _source(dl_manager) -> str:
        path = dl_manager.manual_dir
        if not os.path.isdir(os.fspath(path)):
            raise FileNotFoundError(f"{path}: source folder must be a local directory")
        return os.fspath(path)


@dataclasses.dataclass(eq=False)
class MinAreaConfig(tfds.core.BuilderConfig):
    """Objects whose mask covers less than this fraction of the image are left out."""

    min_area_fraction: float = 0.0


class CocoInpaint(_ReportingBuilder):
    """COCO 2017 instances for object inpainting: one example per non-crowd instance."""

    HOMEPAGE = "https://cocodataset.org"
    MANUAL_DOWNLOAD_INSTRUCTIONS = coco.__doc__
    BUILDER_CONFIGS = [  # noqa: RUF012 (TFDS class attribute)
        MinAreaConfig(
            "default", description="instances >= 1% of the image", min_area_fraction=0.01
        ),
        MinAreaConfig("all", description="every non-crowd instance", min_area_fraction=0.0),
    ]

    def _split_generators(self, dl_manager):
        source = self._source(dl_manager)
        return {
            split: self._generate_examples(source, split) for split in coco.available_splits(source)
        }

    def _generate_examples(self, source: str, split: str):
        report = self._report(split)
        generate = coco.generate(source, split, report, self.builder_config.min_area_fraction)
        yield from records.count_written(generate, report)


class OpenimagesInpaint(_ReportingBuilder):
    """OpenImages V6 segmentation masks for object inpainting: one example per mask."""

    HOMEPAGE = "https://storage.googleapis.com/openimages/web/index.html"
    MANUAL_DOWNLOAD_INSTRUCTIONS = openimages.__doc__
    BUILDER_CONFIGS = [  # noqa: RUF012 (TFDS class attribute)
        MinAreaConfig(name="default", description="every mask (as the reference)"),
    ]

    def _split_generators(self, dl_manager):
        source = self._source(dl_manager)
        splits = openimages.available_splits(source)
        return {split: self._generate_examples(source, split) for split in splits}

    def _generate_examples(self, source: str, split: str):
        report = self._report(split)
        generate = openimages.generate(source, split, report, self.builder_config.min_area_fraction)
        yield from records.count_written(generate, report)


class TextImagePairs(_ReportingBuilder):
    """Text-image pairs (LAION-style): whole-image text, empty mask."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = pairs.__doc__

    def _split_generators(self, dl_manager):
        source = self._source(dl_manager)
        return {
            split: self._generate_examples(source, split)
            for split in pairs.available_splits(source)
        }

    def _generate_examples(self, source: str, split: str):
        report = self._report(split)
        yield from records.count_written(pairs.generate(source, split, report), report)


@dataclasses.dataclass(eq=False)
class SyntheticShapesConfig(tfds.core.BuilderConfig):
    """How many shapes to draw, image sizes, encoding and the seed."""

    num_train: int = 2048
    num_validation: int = 256
    min_size: int = 64  # image sides are drawn uniformly from [min_size, max_size]
    max_size: int = 128
    image_format: str = "png"  # png keeps colours exact; jpeg for benchmarks
    seed: int = 0


class SyntheticShapes(_ReportingBuilder):
    """A coloured shape (circle, square, triangle, star) on a textured gray background."""

    BUILDER_CONFIGS = [  # noqa: RUF012 (TFDS class attribute)
        SyntheticShapesConfig(name="default", description="2048 train / 256 validation, 64-128 px"),
        SyntheticShapesConfig(
            name="tiny", description="64 train / 16 validation", num_train=64, num_validation=16
        ),
    ]

    def _split_generators(self, dl_manager):
        del dl_manager  # generated, nothing to read
        config = self.builder_config
        counts = {"train": config.num_train, "validation": config.num_validation}
        return {split: self._generate_examples(split, n) for split, n in counts.items() if n > 0}

    def _generate_examples(self, split: str, count: int):
        c = self.builder_config
        generate = synthetic.generate(c.seed, split, count, c.min_size, c.max_size, c.image_format)
        yield from records.count_written(generate, self._report(split))


BUILDERS = {
    "coco_inpaint": CocoInpaint,
    "openimages_inpaint": OpenimagesInpaint,
    "text_image_pairs": TextImagePairs,
    "synthetic_shapes": SyntheticShapes,
}
