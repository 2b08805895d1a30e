"""Ahead-of-time compilation of the model's step, one graph per token bucket, and replay."""
