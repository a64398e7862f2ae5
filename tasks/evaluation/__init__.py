"""Evaluation: per-shard mergeable statistics (FID, Inception Score, CLIPScore) and their reduction."""
