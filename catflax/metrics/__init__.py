"""Evaluation metrics: FID (Flax InceptionV3), CLIP-feature FD, CMMD, CLIP score, preservation.

Definitions, pitfalls and the weights each metric needs: docs/EVALUATION.md.
"""

from catflax.metrics.clip_score import (
    CLIPProjections,
    CLIPScorer,
    CLIPWithProjections,
    clip_scores,
    crop_to_mask,
    mask_square_box,
)
from catflax.metrics.distances import (
    FeatureStats,
    cmmd,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    frechet_distance_of,
)
from catflax.metrics.features import inception_features, map_batches
from catflax.metrics.inception import InceptionConfig, InceptionV3
from catflax.metrics.preservation import outside_mask_errors, preservation_metrics
from catflax.metrics.suite import compute_metrics

__all__ = [
    "CLIPProjections",
    "CLIPScorer",
    "CLIPWithProjections",
    "FeatureStats",
    "InceptionConfig",
    "InceptionV3",
    "clip_scores",
    "cmmd",
    "compute_metrics",
    "crop_to_mask",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "frechet_distance_of",
    "inception_features",
    "map_batches",
    "mask_square_box",
    "outside_mask_errors",
    "preservation_metrics",
]
