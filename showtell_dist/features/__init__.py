"""Building a features cache and checking it fits a model (the format is data/feature_cache.py)."""
