"""Data: video I/O (and, later, shards, the synthetic dataset and the embedding cache)."""
