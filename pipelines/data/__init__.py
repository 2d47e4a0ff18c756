"""The data layer: COCO parsing, decode, augmentation, batching, generated data and the Ray Data datasets.

Run ``python -m pipelines.data prepare ...`` to write Parquet shards of a split.
"""
