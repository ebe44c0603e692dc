"""The journal of a pack in progress: what is done and verified, so that an interrupted pack
resumes at the first unfinished layer instead of from zero.

A pack builds its store in ``.<name>.partial`` beside the destination (a store is loadable only
once it is complete and renamed into place); ``progress.json`` there records the source it reads
(path, and each shard's size and header digest), the options that decide the store's bytes, and
every step finished: the resident weights, then each expert layer with its ``LayerSpec`` (the
CRC32 of every record). A step is recorded only after its file was written, flushed to disk and
read back against its checksums; the journal itself is replaced atomically. On a rerun with the
same source and options the recorded layers are verified again (size and every record's CRC32)
and kept up to the first one that fails; the rest is written anew. A partial pack of another
source or other options is discarded.

With ``delete_source_shards``, each source shard is deleted once every tensor read from it is
in a finished, verified step (the journal lists the deleted ones, so a resume does not miss them).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from flashmoe_backend.store.format import (
    LayerSpec,
    Manifest,
    StoreError,
    checksum,
    read_safetensors_header,
)

PROGRESS = "progress.json"
FORMAT = "flashmoe-pack-progress"
VERSION = 1
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def partial_dir(dst: Path) -> Path:
    """Where the store to ``dst`` is built (a hidden sibling; same file system, so the final
    rename is atomic)."""
    return dst.parent / f".{dst.name}.partial"


def source_shards(src: Path) -> list[dict]:
    """The fingerprint of each source shard: name, size and header digest (read in milliseconds;
    the data is not hashed)."""
    return [
        {"file": p.name, "size": p.stat().st_size, "header_sha256": read_safetensors_header(p).digest}
        for p in sorted(src.glob("model*.safetensors"))
    ]


def layer_number(name: str) -> int | None:
    """The decoder layer a tensor belongs to (``...layers.N....``), if any."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def verify_layer_file(path: Path, spec: LayerSpec) -> str | None:
    """None if the layer file holds exactly ``spec``'s records with their CRC32s, else why not.
    The pages are dropped first, so what is checked is what the disk holds."""
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    if size != spec.file_bytes:
        return f"{path}: {size} bytes, expected {spec.file_bytes}"
    buffer = np.empty(spec.record_bytes, dtype=np.uint8)
    with open(path, "rb", buffering=0) as f:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        for e, expected in enumerate(spec.checksums):
            if f.readinto(buffer) != spec.record_bytes or checksum(buffer) != expected:
                return f"{path}: expert {e} fails its checksum"
    return None


@dataclass
class PackProgress:
    """``progress.json`` of one partial store (see the module docstring)."""

    directory: Path
    source: dict  # {"path", "shards": source_shards(...)}
    options: dict  # what decides the store's bytes: bits, group_size, dtype
    resident: bool = False  # model.safetensors written and verified
    layers: list[LayerSpec] = field(default_factory=list)  # finished layers, in order
    deleted_shards: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, directory: Path, src: Path, options: dict) -> tuple[PackProgress, str | None]:
        """The progress to continue in ``directory``: the recorded one when it was made from the
        same source and options (its layers verified again, kept up to the first failure), else a
        fresh one. Returns it and a notice for the user (what is resumed or discarded), or None."""
        source = {"path": str(src.resolve()), "shards": source_shards(src)}
        fresh = cls(directory, source, options)
        path = directory / PROGRESS
        if not directory.exists():
            return fresh, None
        old = cls._read(directory)
        if old is None or old.options != options or not old._same_source(source):
            return fresh, (
                f"flashmoe pack: discarding the partial pack in {directory} (made from another "
                f"source or with other options, or unreadable: {path})"
            )
        kept, problem = [], None
        for spec in old.layers:
            problem = verify_layer_file(directory / spec.file, spec)
            if problem is not None:
                break
            kept.append(spec)
        resumed = cls(directory, old.source, options, old.resident, kept, old.deleted_shards)
        again = f", {len(old.layers) - len(kept)} to write again ({problem})" if problem else ""
        return resumed, (
            f"flashmoe pack: resuming the partial pack in {directory}: "
            f"{len(kept)} finished layer(s) verified{again}"
        )

    @classmethod
    def _read(cls, directory: Path) -> PackProgress | None:
        try:
            data = json.loads((directory / PROGRESS).read_text())
            if data.get("format") != FORMAT or data.get("version") != VERSION:
                return None
            # Manifest.from_dict checks every field of the recorded layers, as a store's.
            layers = Manifest.from_dict(
                {"format": "flashmoe-store", "version": 2, "model_type": "", "layers": data["layers"]
                 or [_PLACEHOLDER], "tokenizer_files": [], "alignment": 4096},
                directory / PROGRESS,
            ).layers
            return cls(
                directory,
                data["source"],
                data["options"],
                bool(data["resident"]),
                layers if data["layers"] else [],
                list(data.get("deleted_shards", [])),
            )
        except (OSError, ValueError, KeyError, TypeError, StoreError):
            return None

    def _same_source(self, source: dict) -> bool:
        """Same path and shards; shards this pack deleted are no longer there to compare."""
        if self.source.get("path") != source["path"]:
            return False
        recorded = {s["file"]: s for s in self.source.get("shards", [])}
        now = {s["file"]: s for s in source["shards"]}
        present = {name: s for name, s in recorded.items() if name not in self.deleted_shards}
        return present == now

    def save(self) -> None:
        """Replace ``progress.json`` atomically (written, flushed, renamed)."""
        data = {
            "format": FORMAT,
            "version": VERSION,
            "source": self.source,
            "options": self.options,
            "resident": self.resident,
            "layers": [asdict(spec) for spec in self.layers],
            "deleted_shards": self.deleted_shards,
        }
        tmp = self.directory / f".{PROGRESS}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.directory / PROGRESS)

    def done_bytes(self) -> int:
        """Bytes of the store already written and kept (for the free-space check)."""
        return sum(spec.file_bytes for spec in self.layers)

    def consumed_shards(self, src: Path, layer_numbers: list[int]) -> list[Path]:
        """Source shards every tensor of which is in a finished step: the resident weights are
        written, and each tensor of a decoder layer belongs to a finished expert layer's decoder
        layer (its other tensors are resident). ``layer_numbers`` is the decoder layer of each
        expert layer, in pack order. Shards already deleted are left out."""
        if not self.resident:
            return []
        moe = set(layer_numbers)
        finished = set(layer_numbers[: len(self.layers)])
        out = []
        for path in sorted(src.glob("model*.safetensors")):
            if path.name in self.deleted_shards:
                continue
            numbers = {layer_number(name) for name in read_safetensors_header(path).tensors}
            if all(n is None or n not in moe or n in finished for n in numbers):
                out.append(path)
        return out


_PLACEHOLDER = {  # lets Manifest.from_dict check an empty layer list (it requires one layer)
    "module": "-", "file": "-", "num_experts": 1, "record_bytes": 1, "tensors": [],
    "quantization": None, "checksums": [0],
}
