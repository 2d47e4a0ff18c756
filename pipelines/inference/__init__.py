"""Batch inference with Ray Data: image listing, decode and model steps, whole output files, the job driver."""
