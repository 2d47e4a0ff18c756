"""Deformable DETR on Ray: entry scripts (train.py, evaluate.py, bench_train.py) over a shared library.

The library: ``config`` (the run config and presets), ``storage`` (local, s3://, gs://), ``engine`` (the
training and evaluation loops as plain functions), ``data/`` (the data layer) and ``raytrain/`` (the Ray
Train plumbing). No module imports an entry script.
"""
