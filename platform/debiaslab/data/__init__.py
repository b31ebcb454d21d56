"""Data: one Parquet schema (schema.py), embedded digits, source loaders and `build_dataset`
(sources.py), imbalance builders (builders.py) and the in-memory `ImageDataset` (dataset.py)."""
