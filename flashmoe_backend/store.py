"""The on-disk expert store: its manifest, record layout and integrity checks.

A store is a directory::

    config.json            the model config (mlx-lm's, with its ``quantization`` entry)
    model.safetensors      resident (non-expert) weights, mlx-lm parameter names
    tokenizer files        copied from the source checkpoint
    experts/layer_NNN.bin  one file per MoE layer; expert ``e`` is the record at ``e * record_bytes``
    manifest.json          format version, per-layer tensor layout, quantization, checksums

One expert is one contiguous record (gate, up, down with their scales and biases), padded to
``ALIGNMENT`` so that one aligned ``preadv`` reads exactly one expert, also with O_DIRECT.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

FORMAT_NAME = "flashmoe-store"
FORMAT_VERSION = 1
ALIGNMENT = 4096
MANIFEST = "manifest.json"
CONFIG = "config.json"
RESIDENT = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
# One of these must exist for a store to have a tokenizer at all.
TOKENIZER_REQUIRED = ("tokenizer.json", "tokenizer.model")


class StoreError(ValueError):
    """A store (or a packing source) is missing, malformed or corrupt. The message names the file."""


@dataclass(frozen=True)
class TensorSpec:
    """One tensor inside an expert record (``name`` relative to the SwitchGLU module)."""

    name: str
    dtype: str  # an mlx dtype name: "uint32", "bfloat16", "float32", ...
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass
class LayerSpec:
    """The expert file of one MoE layer."""

    module: str  # the SwitchGLU's module path in the mlx-lm model
    file: str  # relative to the store directory
    num_experts: int
    record_bytes: int  # aligned size of one record
    tensors: list[TensorSpec]
    quantization: dict | None  # {"group_size", "bits", "mode"} or None for float experts
    checksums: list[int] = field(default_factory=list)  # crc32 of each whole record

    @property
    def file_bytes(self) -> int:
        return self.num_experts * self.record_bytes


@dataclass
class Manifest:
    """Everything needed to find, check and interpret the expert records of a store."""

    model_type: str
    layers: list[LayerSpec]
    tokenizer_files: list[str]
    alignment: int = ALIGNMENT
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    @property
    def expert_bytes(self) -> int:
        """Total bytes of all expert records."""
        return sum(layer.file_bytes for layer in self.layers)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, data: dict, source: Path) -> Manifest:
        try:
            if data.get("format") != FORMAT_NAME:
                raise StoreError(f"{source}: not a flashmoe store manifest")
            if data.get("version") != FORMAT_VERSION:
                raise StoreError(
                    f"{source}: store format version {data.get('version')} is not supported "
                    f"(this flashmoe reads version {FORMAT_VERSION}); re-pack the model"
                )
            layers = [
                LayerSpec(
                    module=layer["module"],
                    file=layer["file"],
                    num_experts=int(layer["num_experts"]),
                    record_bytes=int(layer["record_bytes"]),
                    tensors=[
                        TensorSpec(t["name"], t["dtype"], tuple(t["shape"]), t["offset"], t["nbytes"])
                        for t in layer["tensors"]
                    ],
                    quantization=layer["quantization"],
                    checksums=[int(c) for c in layer["checksums"]],
                )
                for layer in data["layers"]
            ]
            return cls(
                model_type=data["model_type"],
                layers=layers,
                tokenizer_files=list(data["tokenizer_files"]),
                alignment=int(data["alignment"]),
            )
        except (KeyError, TypeError) as e:
            raise StoreError(f"{source}: malformed manifest, missing or bad field {e}") from e


def align(n: int, alignment: int = ALIGNMENT) -> int:
    """Round ``n`` up to a multiple of ``alignment``."""
    return -(-n // alignment) * alignment


def record_layout(arrays: dict[str, tuple[str, tuple[int, ...], int]]) -> tuple[list[TensorSpec], int]:
    """Lay tensors (name -> (dtype, shape, nbytes)) out in one record; returns specs and record size.

    Tensors start on 64-byte boundaries so that each one is a well-aligned view of the record.
    """
    specs, offset = [], 0
    for name in sorted(arrays):
        dtype, shape, nbytes = arrays[name]
        specs.append(TensorSpec(name, dtype, tuple(shape), offset, nbytes))
        offset = align(offset + nbytes, 64)
    return specs, align(offset)


def checksum(buffer) -> int:
    """CRC32 of a record (zlib releases the GIL on large buffers, so reader threads overlap)."""
    return zlib.crc32(buffer)


def read_manifest(store: Path) -> Manifest:
    """Read and parse ``manifest.json`` of a store."""
    path = store / MANIFEST
    if not store.is_dir():
        raise StoreError(f"{store}: no such store directory")
    if not path.is_file():
        raise StoreError(f"{path}: missing; {store} is not a flashmoe store (run `flashmoe pack`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}: not valid JSON ({e})") from e
    return Manifest.from_dict(data, path)


def read_config(store: Path) -> dict:
    path = store / CONFIG
    if not path.is_file():
        raise StoreError(f"{path}: missing model config")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}: not valid JSON ({e})") from e


def check_store(store: Path, manifest: Manifest, config: dict) -> None:
    """Cheap structural checks done at every load: files present, sizes and shapes consistent.

    Raises ``StoreError`` naming the file and the problem. Record contents are checked by
    checksum when read (see ``ExpertReader``) and in full by ``verify_store``.
    """
    if manifest.model_type != config.get("model_type"):
        raise StoreError(
            f"{store / MANIFEST}: model_type {manifest.model_type!r} disagrees with "
            f"{store / CONFIG} ({config.get('model_type')!r})"
        )
    if not any((store / name).is_file() for name in TOKENIZER_REQUIRED):
        raise StoreError(f"{store}: missing tokenizer file (one of {', '.join(TOKENIZER_REQUIRED)})")
    for name in manifest.tokenizer_files:
        if not (store / name).is_file():
            raise StoreError(f"{store / name}: missing tokenizer file listed in the manifest")
    if not (store / RESIDENT).is_file():
        raise StoreError(f"{store / RESIDENT}: missing resident weights")
    text = config.get("text_config", config)
    num_experts = text.get("num_experts", text.get("num_local_experts"))
    for layer in manifest.layers:
        path = store / layer.file
        if num_experts is not None and layer.num_experts != num_experts:
            raise StoreError(
                f"{store / MANIFEST}: {layer.module} has {layer.num_experts} experts but "
                f"{store / CONFIG} says num_experts={num_experts}"
            )
        if len(layer.checksums) != layer.num_experts:
            raise StoreError(f"{store / MANIFEST}: {layer.module} lists {len(layer.checksums)} "
                             f"checksums for {layer.num_experts} experts")
        if layer.record_bytes % manifest.alignment:
            raise StoreError(f"{store / MANIFEST}: {layer.module} record size is not aligned")
        end = max(t.offset + t.nbytes for t in layer.tensors)
        if end > layer.record_bytes:
            raise StoreError(f"{store / MANIFEST}: {layer.module} tensors overrun the record")
        if not path.is_file():
            raise StoreError(f"{path}: missing expert file")
        size = path.stat().st_size
        if size != layer.file_bytes:
            raise StoreError(
                f"{path}: expert file is {size} bytes, the manifest expects {layer.file_bytes} "
                f"({layer.num_experts} records of {layer.record_bytes}); truncated or wrong file"
            )
    _check_shapes(store, manifest, text)


def _check_shapes(store: Path, manifest: Manifest, text_config: dict) -> None:
    """The expert tensors must have the config's hidden and expert-intermediate sizes."""
    hidden = text_config.get("hidden_size")
    inter = text_config.get("moe_intermediate_size")
    if hidden is None or inter is None:
        return
    for layer in manifest.layers:
        shapes = {t.name: t.shape for t in layer.tensors}
        weight = shapes.get("down_proj.weight")
        if weight is None:
            continue
        if weight[0] != hidden:
            raise StoreError(
                f"{store / MANIFEST}: {layer.module}.down_proj.weight has {weight[0]} output rows "
                f"but {store / CONFIG} says hidden_size={hidden}"
            )
        gate = shapes.get("gate_proj.weight")
        if gate is not None and gate[0] != inter:
            raise StoreError(
                f"{store / MANIFEST}: {layer.module}.gate_proj.weight has {gate[0]} rows "
                f"but {store / CONFIG} says moe_intermediate_size={inter}"
            )


@dataclass
class VerifyReport:
    """Result of a full checksum pass over a store."""

    records: int
    bytes: int
    bad: list[tuple[str, int]]  # (file, expert index)

    @property
    def ok(self) -> bool:
        return not self.bad


def verify_store(store: Path, progress: bool = False) -> VerifyReport:
    """Check every expert record against its manifest checksum."""
    from tqdm import tqdm

    manifest = read_manifest(store)
    check_store(store, manifest, read_config(store))
    bad, count, nbytes = [], 0, 0
    total = sum(layer.num_experts for layer in manifest.layers)
    with tqdm(total=total, disable=not progress, unit="expert", desc="verify") as bar:
        for layer in manifest.layers:
            buffer = np.empty(layer.record_bytes, dtype=np.uint8)
            with open(store / layer.file, "rb", buffering=0) as f:
                for e, expected in enumerate(layer.checksums):
                    f.readinto(buffer)
                    if checksum(buffer) != expected:
                        bad.append((layer.file, e))
                    count += 1
                    nbytes += layer.record_bytes
                    bar.update()
    return VerifyReport(records=count, bytes=nbytes, bad=bad)
