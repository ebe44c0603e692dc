"""Where each expert's bytes are: the interface between a model source and the expert reader.

Two sources implement it, and nothing else in the engine tells them apart:

* ``PackedStore`` (here): a store made by ``flashmoe pack``; expert ``e`` of a layer is one
  aligned record at ``e * record_bytes`` of the layer's file (``format.py``), checked against the
  CRC32 the manifest holds;
* ``Checkpoint`` (``checkpoint.py``): an mlx-community checkpoint read in place; expert ``e`` is
  one slice of each stacked ``[E, ...]`` tensor in the safetensors shards, checked against the
  CRC32 recorded on its first read.

For each (layer, expert) the reader asks ``extents``: the byte ranges to read, each with the
tensors inside it, and hands each range's CRC32 to ``check``. The cache, the streaming layer and
the engine see only ``manifest`` (module paths, record sizes for the cache budget, quantization)
and ``config``; mlx-lm loads the resident weights and the tokenizer from ``root``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from flashmoe_backend.store.format import (
    MANIFEST,
    RESIDENT,
    Manifest,
    StoreError,
    TensorSpec,
    check_store,
    read_config,
    read_manifest,
    safetensors_header,
)


@dataclass(frozen=True)
class Extent:
    """One contiguous byte range of an expert in one file, and the tensors inside it."""

    file: int  # index into the source's ``files``
    offset: int  # byte offset in the file
    nbytes: int
    tensors: tuple[TensorSpec, ...]  # each tensor's ``offset`` is relative to the extent


class ExpertSource(Protocol):
    """What the engine and the expert reader need of a model source."""

    #: the directory mlx-lm loads ``config.json``, the resident weights and the tokenizer from
    root: Path
    #: the expert layers: module paths, record sizes (the cache's unit), quantization
    manifest: Manifest
    #: the parsed ``config.json``
    config: dict
    #: the files the extents point into, opened once by the reader
    files: Sequence[Path]

    def extents(self, layer: int, expert: int) -> list[Extent]:
        """The byte ranges holding one expert, in the order to read them."""

    def staging_bytes(self, layer: int) -> int:
        """A staging buffer size that holds every expert's extents of ``layer``, each read as its
        aligned superset (``ALIGNMENT``-aligned offset and length, as O_DIRECT requires), each
        superset starting on an aligned boundary of the buffer."""

    def check(self, layer: int, expert: int, extent: int, crc: int) -> None:
        """Check the CRC32 of one extent just read; ``StoreError`` naming the file, layer and
        expert when it is not what the source expects."""

    def resident_header(self) -> dict:
        """The safetensors tensor table of the resident (non-expert) weights."""

    def resident_bytes(self) -> int:
        """Bytes of the resident weights on disk."""

    def fingerprint(self) -> bytes:
        """Bytes that change whenever the experts' layout or checksums do (prompt-cache files are
        only valid for one fingerprint)."""

    def flush(self) -> None:
        """Persist what was learnt while reading (a source without state does nothing)."""


class PackedStore:
    """A store made by ``flashmoe pack``: one aligned record per expert, CRC32s in the manifest.

    ``PackedStore.open(root)`` reads and checks the store (``check_store``); the constructor
    takes an already read manifest as it is (the benchmarks build stores of their own).
    """

    def __init__(self, root: Path, manifest: Manifest, config: dict | None = None):
        self.root = Path(root)
        self.manifest = manifest
        self.config = config if config is not None else {}
        self.files = [self.root / layer.file for layer in manifest.layers]
        # One extent per expert: the whole record, the tensors where the record layout put them.
        self._records = [
            Extent(i, 0, layer.record_bytes, tuple(layer.tensors)) for i, layer in enumerate(manifest.layers)
        ]

    @classmethod
    def open(cls, root: Path) -> PackedStore:
        """Read and check the store at ``root`` (``StoreError`` naming the file at fault)."""
        manifest = read_manifest(root)
        config = read_config(root)
        check_store(root, manifest, config)
        return cls(root, manifest, config)

    def extents(self, layer: int, expert: int) -> list[Extent]:
        record = self._records[layer]
        return [replace(record, offset=expert * record.nbytes)]

    def staging_bytes(self, layer: int) -> int:
        return self.manifest.layers[layer].record_bytes  # records are aligned already

    def check(self, layer: int, expert: int, extent: int, crc: int) -> None:
        spec = self.manifest.layers[layer]
        if crc != spec.checksums[expert]:
            raise StoreError(
                f"{self.root / spec.file}: checksum mismatch in expert {expert} of {spec.module} "
                f"(record at byte {expert * spec.record_bytes}); the store is corrupt, run "
                f"`flashmoe verify`"
            )

    def resident_header(self) -> dict:
        return safetensors_header(self.root / RESIDENT)

    def resident_bytes(self) -> int:
        return (self.root / RESIDENT).stat().st_size

    def fingerprint(self) -> bytes:
        return (self.root / MANIFEST).read_bytes()

    def flush(self) -> None:
        pass


def as_source(store: Path | ExpertSource, manifest: Manifest | None = None) -> ExpertSource:
    """``store`` itself if it is a source already, else the packed store at that directory with
    ``manifest`` (code written for packed stores passes ``(store_dir, manifest)``)."""
    if not isinstance(store, (str, os.PathLike)):
        return store
    if manifest is None:
        raise TypeError(f"{store}: a store directory needs its manifest")
    return PackedStore(Path(store), manifest)
