"""Metrics, checkpoints, logging and small helpers shared by the scripts."""
