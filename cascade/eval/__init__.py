"""Evaluation: feature statistics and distances (FID / FVD)."""

from cascade.eval.stats import FeatureStats, check_protocols, frechet_distance

__all__ = ["FeatureStats", "check_protocols", "frechet_distance"]
