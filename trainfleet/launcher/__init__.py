"""Starts and supervises workers: locally, across nodes, or through SLURM."""
