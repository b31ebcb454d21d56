"""`ImageDataset`: a dataset folder (Parquet shards + manifest) decoded once into uint8 tensors,
with the content hash checked on load (optional)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import Dataset

from debiaslab.data.pixels import from_uint8
from debiaslab.data.schema import (
    NO_LABEL,
    SCHEMA,
    Manifest,
    combine_digests,
    data_error,
    decode_png,
    read_manifest,
    table_digests,
)
from debiaslab.progress import progress

PROGRESS_MIN_IMAGES = 1000  # show a progress bar when decoding at least this many images


def _read_shard(path: Path) -> pa.Table:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise data_error(path, f"cannot read shard ({exc})") from None
    names_types = [(f.name, f.type) for f in table.schema]
    expected = [(f.name, f.type) for f in SCHEMA]
    if names_types != expected:
        raise data_error(path, f"schema {names_types} differs from the dataset schema {expected}")
    return table


class ImageDataset(Dataset):
    """All rows of a dataset folder in memory: images uint8 (N, C, H, W), labels int64 (N,)
    with -1 for none, attributes int8 (N, A). Items are (image uint8 (C, H, W), label int)."""

    def __init__(
        self,
        manifest: Manifest,
        ids: list[str],
        images: torch.Tensor,
        labels: torch.Tensor,
        attributes: torch.Tensor,
    ) -> None:
        self.manifest = manifest
        self.ids = ids
        self.images = images
        self.labels = labels
        self.attributes = attributes

    @classmethod
    def load(cls, path: str | os.PathLike[str], verify: bool = True) -> "ImageDataset":
        """Read every shard, decode the PNGs once, and (with `verify`) recompute the content
        hash from the stored bytes (cheap next to decoding) and compare it with the manifest."""
        manifest = read_manifest(path)
        tables = []
        for shard, shard_path in zip(manifest.shards, manifest.shard_paths()):
            table = _read_shard(shard_path)
            if table.num_rows != shard["num_rows"]:
                raise data_error(
                    shard_path, f"holds {table.num_rows} rows, manifest says {shard['num_rows']}"
                )
            tables.append(table)
        table = pa.concat_tables(tables)
        where = manifest.path
        num_attrs = len(manifest.attr_names)
        lengths = pc.list_value_length(table.column("attributes")).to_numpy(zero_copy_only=False)
        if (lengths != num_attrs).any():
            raise data_error(where, f"some rows do not have {num_attrs} attributes")
        attributes = (
            table.column("attributes").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        ).astype(np.int8).reshape(table.num_rows, num_attrs)
        labels = table.column("label").to_numpy().astype(np.int64)
        bad = (labels != NO_LABEL) & ((labels < 0) | (labels >= manifest.num_classes))
        if bad.any():
            raise data_error(where, f"label {int(labels[bad][0])} out of range")
        ids = table.column("id").to_pylist()
        if len(set(ids)) != len(ids):
            raise data_error(where, "duplicate ids")
        if verify:
            digest = combine_digests(table_digests(table))
            if digest != manifest.content_hash:
                raise data_error(
                    where, f"content hash {digest[:12]}... does not match the manifest's "
                    f"{manifest.content_hash[:12]}... (files changed after writing?)"
                )
        channels = manifest.image_shape[0]
        images = np.empty((table.num_rows, *manifest.image_shape), dtype=np.uint8)
        blobs = table.column("image").to_pylist()
        bar = progress(
            enumerate(blobs),
            total=len(blobs),
            desc=f"decoding {manifest.name}",
            unit="img",
            disable=len(blobs) < PROGRESS_MIN_IMAGES,
        )
        for i, blob in bar:
            try:
                image = decode_png(blob, channels)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                raise data_error(where, f"row {ids[i]!r}: cannot decode image ({exc})") from None
            if image.shape != manifest.image_shape:
                raise data_error(
                    where, f"row {ids[i]!r}: image {image.shape} != {manifest.image_shape}"
                )
            images[i] = image
        return cls(
            manifest,
            ids,
            torch.from_numpy(images),
            torch.from_numpy(labels),
            torch.from_numpy(attributes),
        )

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest.class_names)

    @property
    def attr_names(self) -> list[str]:
        return list(self.manifest.attr_names)

    @property
    def content_hash(self) -> str:
        return self.manifest.content_hash

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of every image."""
        return self.manifest.image_shape

    def class_counts(self) -> list[int]:
        """Images per class (unlabelled rows, label -1, are not counted)."""
        labelled = self.labels[self.labels != NO_LABEL]
        return torch.bincount(labelled, minlength=self.num_classes).tolist()

    @staticmethod
    def to_float(batch: torch.Tensor) -> torch.Tensor:
        """uint8 0..255 -> float32 in [-1, 1]."""
        return from_uint8(batch)
