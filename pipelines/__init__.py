"""Deformable DETR on Ray: entry scripts (train.py, evaluate.py, infer.py) over a shared library.

The library: ``config`` (the run config and presets), ``storage`` (local, s3://, gs://), ``engine`` (the
training and evaluation loops as plain functions), ``data/`` (the data layer), ``raytrain/`` (the Ray
Train plumbing) and ``inference/`` (batch inference on Ray Data). No module imports an entry script.
"""
