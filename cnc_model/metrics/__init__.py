"""Measurements of generated images: mergeable FID / Inception Score / mean statistics, feature
nets, and GLoD's CLIP alignment scores."""

from cnc_model.metrics.frechet import FrechetStats, frechet_distance
from cnc_model.metrics.inception_score import InceptionScoreStats, split_of
from cnc_model.metrics.mean_stats import MeanStats, clip_scores

__all__ = ["FrechetStats", "InceptionScoreStats", "MeanStats", "clip_scores", "frechet_distance", "split_of"]
