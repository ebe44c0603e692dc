"""The on-disk expert store: its manifest, record layout and integrity checks.

A store is a directory::

    config.json            the model config (mlx-lm's, with its ``quantization`` entry)
    model.safetensors      resident (non-expert) weights, mlx-lm parameter names
    tokenizer files        copied from the source checkpoint
    experts/layer_NNN.bin  one file per MoE layer; expert ``e`` is the record at ``e * record_bytes``
    manifest.json          format version, per-layer tensor layout, quantization, checksums

One expert is one contiguous record (gate, up, down with their scales and biases), padded to
``ALIGNMENT`` so that one aligned ``preadv`` reads exactly one expert, also with O_DIRECT.

Quantization is chosen per tensor and recorded the way mlx-lm's per-layer quantization config
does: a layer's ``quantization`` holds the default ``{"group_size", "bits", "mode"}`` of its
projections plus an override per projection that differs (``"down_proj": {...}``, or ``false``
for one kept in float), and ``config.json``'s ``quantization`` holds the same per module path.
A manifest with such overrides is format version 2; one without is version 1, which older
flashmoe versions read too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import zlib
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

FORMAT_NAME = "flashmoe-store"
FORMAT_VERSION = 2  # the newest version written; see ``required_version``
SUPPORTED_VERSIONS = (1, 2)
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
    # {"group_size", "bits", "mode"} of the projections, plus per-projection overrides
    # ({"down_proj": {...} or False}) as in mlx-lm's config; None when every projection is float.
    quantization: dict | None
    checksums: list[int] = field(default_factory=list)  # crc32 of each whole record

    @property
    def file_bytes(self) -> int:
        return self.num_experts * self.record_bytes

    @property
    def projections(self) -> list[str]:
        """The modules of a record (``gate_proj``, ``up_proj``, ``down_proj``, ...), in order."""
        return [t.name.removesuffix(".weight") for t in self.tensors if t.name.endswith(".weight")]

    def module_quantization(self, module: str) -> dict | None:
        """``{"group_size", "bits", "mode"}`` of one projection, or None if it is kept in float."""
        return module_quantization(self.quantization, module)

    @property
    def has_overrides(self) -> bool:
        """Whether some projection is quantized unlike the layer's default."""
        return any(isinstance(v, dict) or v is False for v in (self.quantization or {}).values())


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
        """The manifest of parsed ``manifest.json`` data; ``StoreError`` naming ``source`` and
        the field at fault (``layers[0].num_experts``) for a missing field or a bad value."""
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise StoreError(f"{source}: not a flashmoe store manifest")
        if data.get("version") not in SUPPORTED_VERSIONS:
            raise StoreError(
                f"{source}: store format version {data.get('version')} is not supported "
                f"(this flashmoe reads versions {', '.join(map(str, SUPPORTED_VERSIONS))}); "
                f"re-pack the model"
            )
        fields = _ManifestFields(source)
        layers = []
        for i, layer in enumerate(fields.objects(data, "layers")):
            at = f"layers[{i}]"
            tensors = [
                TensorSpec(
                    fields.text(t, "name", f"{at}.tensors[{j}]"),
                    fields.text(t, "dtype", f"{at}.tensors[{j}]"),
                    tuple(fields.integers(t, "shape", f"{at}.tensors[{j}]")),
                    fields.integer(t, "offset", f"{at}.tensors[{j}]", minimum=0),
                    fields.integer(t, "nbytes", f"{at}.tensors[{j}]", minimum=0),
                )
                for j, t in enumerate(fields.objects(layer, "tensors", at))
            ]
            spec = LayerSpec(
                module=fields.text(layer, "module", at),
                file=fields.text(layer, "file", at),
                num_experts=fields.integer(layer, "num_experts", at, minimum=1),
                record_bytes=fields.integer(layer, "record_bytes", at, minimum=1),
                tensors=tensors,
                quantization=fields.get(layer, "quantization", at),
                checksums=fields.integers(layer, "checksums", at, crc32=True),
            )
            _check_quantization_fields(source, spec)
            layers.append(spec)
        return cls(
            model_type=fields.text(data, "model_type"),
            layers=layers,
            tokenizer_files=[
                fields.check(name, isinstance(name, str), f"tokenizer_files[{k}]", "a string")
                for k, name in enumerate(fields.get(data, "tokenizer_files", kind=list, what="a list"))
            ],
            alignment=fields.integer(data, "alignment", minimum=1),
            version=int(data["version"]),
        )


class _ManifestFields:
    """Typed reads of ``manifest.json`` fields: a missing field or a bad value is a
    ``StoreError`` naming the file and the field's path (``layers[2].tensors[0].offset``)."""

    def __init__(self, source: Path):
        self.source = source

    def check(self, value, ok: bool, field: str, what: str):
        """``value`` if ``ok``, else the error that the field must be ``what``."""
        if not ok:
            raise StoreError(
                f"{self.source}: malformed manifest: field '{field}' must be {what}, got {value!r}; "
                "re-pack the store"
            )
        return value

    def get(self, obj: dict, key: str, at: str = "", kind: type | None = None, what: str = ""):
        field = f"{at}.{key}" if at else key
        if key not in obj:
            raise StoreError(f"{self.source}: malformed manifest: missing field '{field}'; re-pack the store")
        value = obj[key]
        return value if kind is None else self.check(value, isinstance(value, kind), field, what)

    def text(self, obj: dict, key: str, at: str = "") -> str:
        return self.get(obj, key, at, str, "a string")

    def integer(self, obj: dict, key: str, at: str = "", *, minimum: int) -> int:
        value = self.get(obj, key, at)
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        return self.check(value, _is_int(value) and value >= minimum, f"{at}.{key}" if at else key, what)

    def integers(self, obj: dict, key: str, at: str = "", *, crc32: bool = False) -> list[int]:
        """A list of integers >= 0 (CRC32s with ``crc32``: below 2**32)."""
        field = f"{at}.{key}" if at else key
        values = self.get(obj, key, at, list, "a list of integers")
        what = "a CRC32 (an integer in [0, 2**32))" if crc32 else "an integer >= 0"
        for k, v in enumerate(values):
            self.check(v, _is_int(v) and 0 <= v < (2**32 if crc32 else math.inf), f"{field}[{k}]", what)
        return list(values)

    def objects(self, obj: dict, key: str, at: str = "") -> list[dict]:
        """A non-empty list of JSON objects."""
        field = f"{at}.{key}" if at else key
        values = self.get(obj, key, at, list, "a non-empty list of objects")
        self.check(values, bool(values), field, "a non-empty list of objects")
        for k, v in enumerate(values):
            self.check(v, isinstance(v, dict), f"{field}[{k}]", "an object")
        return values


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


QUANT_KEYS = ("group_size", "bits", "mode")


def module_quantization(quantization: dict | None, module: str) -> dict | None:
    """One module's quantization from an mlx-lm style ``quantization`` dict (its own entry if it
    has one, else the default); None if it is kept in float."""
    if quantization is None:
        return None
    own = quantization.get(module, True)
    if own is False:
        return None
    params = own if isinstance(own, dict) else quantization
    if "group_size" not in params or "bits" not in params:
        return None
    return {"group_size": params["group_size"], "bits": params["bits"], "mode": params.get("mode", "affine")}


def layer_quantization(per_module: dict[str, dict | None]) -> dict | None:
    """The mlx-lm style ``quantization`` of a layer from each projection's own choice: the most
    common choice is the default, the others are overrides (``False`` for a float projection)."""
    chosen = [tuple(q[k] for k in QUANT_KEYS) for q in per_module.values() if q is not None]
    if not chosen:
        return None
    default = dict(zip(QUANT_KEYS, Counter(chosen).most_common(1)[0][0], strict=True))
    overrides = {
        name: (dict(q) if q is not None else False)
        for name, q in per_module.items()
        if q is None or tuple(q[k] for k in QUANT_KEYS) != tuple(default.values())
    }
    return {**default, **overrides}


def required_version(layers: Iterable[LayerSpec]) -> int:
    """The oldest format version that describes these layers (2 only for per-tensor overrides)."""
    return 2 if any(layer.has_overrides for layer in layers) else 1


def _check_quantization_fields(source: Path, layer: LayerSpec) -> None:
    q = layer.quantization
    if q is None:
        return
    if not isinstance(q, dict):
        raise StoreError(f"{source}: {layer.module}: quantization must be an object or null, got {q!r}")
    for name in layer.projections:
        own = q.get(name, True)
        if own is False:
            continue
        params = own if own is not True else {k: q[k] for k in QUANT_KEYS if k in q}
        if not isinstance(params, dict) or not all(
            isinstance(params.get(k), int) for k in ("group_size", "bits")
        ):
            raise StoreError(
                f"{source}: {layer.module}.{name}: malformed quantization {params!r} "
                f"(needs integer group_size and bits)"
            )


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
    """Read and parse ``manifest.json`` of a store. A path without a store is refused as
    ``FlashMoE.load`` refuses it (``find_store``: ``StoreNotFoundError``, one wording)."""
    from flashmoe_backend.store.source import find_store  # here: source imports this module

    store = find_store(store)
    path = store / MANIFEST
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
            raise StoreError(
                f"{store / MANIFEST}: {layer.module} lists {len(layer.checksums)} "
                f"checksums for {layer.num_experts} experts"
            )
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
    for layer in manifest.layers:
        _check_record_quantization(store, layer)


def _check_record_quantization(store: Path, layer: LayerSpec) -> None:
    """Each projection's tensors must be what its recorded quantization says they are, so that a
    mis-recorded store is named here rather than failing deep inside the model's quantization."""
    shapes = {t.name: t.shape for t in layer.tensors}
    for name in layer.projections:
        q = layer.module_quantization(name)
        where = f"{store / MANIFEST}: {layer.module}.{name}"
        if q is None:
            if f"{name}.scales" in shapes:
                raise StoreError(
                    f"{where} has quantization scales but the manifest records it "
                    f"as unquantized; re-pack the store"
                )
            continue
        if f"{name}.scales" not in shapes:
            raise StoreError(
                f"{where} is stored unquantized (no {name}.scales) but the manifest says "
                f"{describe_quantization(q)}; the store was packed with wrong per-tensor "
                f"quantization (flashmoe before format version 2): re-pack it"
            )
        packed, groups = shapes[f"{name}.weight"][-1], shapes[f"{name}.scales"][-1]
        if packed * 32 % q["bits"] or packed * 32 // q["bits"] != groups * q["group_size"]:
            raise StoreError(
                f"{where}: weight {list(shapes[f'{name}.weight'])} and scales "
                f"{list(shapes[f'{name}.scales'])} do not match the recorded "
                f"{describe_quantization(q)}; re-pack the store"
            )


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


# --------------------------------------------------------------------------------------------
# Quantization per tensor kind (for `flashmoe info` and pack's notices)
# --------------------------------------------------------------------------------------------

# Order of the kinds in a summary; kinds not listed follow in order of appearance.
KIND_ORDER = ("experts", "attention", "shared expert", "router", "mlp", "embed", "lm_head")
_PROJECTION_ORDER = {"gate_proj": 0, "up_proj": 1, "down_proj": 2}
_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "U32": "uint32",
    "U8": "uint8",
    "I32": "int32",
    "I64": "int64",
}


def tensor_kind(path: str, experts: Collection[str] = ()) -> tuple[str, str]:
    """``(kind, member)`` of a module path, e.g. ``("attention", "q_proj")``, ``("router",
    "gate")`` or, for a projection of one of the ``experts`` modules, ``("experts",
    "down_proj")``. Layer indices are dropped so that every layer's module is one kind."""
    parent, _, leaf = path.rpartition(".")
    if parent in experts:
        return "experts", leaf
    parts = path.split(".")
    inside = next((i + 2 for i, p in enumerate(parts[:-1]) if p == "layers" and parts[i + 1].isdigit()), None)
    if inside is None:
        return ("embed" if leaf in ("embed_tokens", "wte", "embed") else leaf), leaf
    rest = parts[inside:]
    block, member = rest[0], rest[-1]
    if block.endswith(("attn", "attention")):
        return "attention", member
    if len(rest) >= 3 and rest[1] == "shared_expert":
        return "shared expert", member
    if len(rest) == 2 and (member in ("gate", "router") or member.endswith("_gate")):
        return "router", member
    if block in ("mlp", "block_sparse_moe", "feed_forward", "moe"):
        return "mlp", member
    return block, member


def describe_quantization(params: dict | None, dtype: str = "float") -> str:
    """``"4-bit g64"`` (plus the mode unless affine), or ``"unquantized <dtype>"``."""
    if params is None:
        return f"unquantized {dtype}"
    mode = params.get("mode", "affine")
    return f"{params['bits']}-bit g{params['group_size']}" + ("" if mode == "affine" else f" {mode}")


def summarize_kinds(entries: Iterable[tuple[str, str, str]]) -> dict[str, str]:
    """``(kind, member, description)`` per module -> ``{kind: text}``: the description alone when
    a kind's members agree, else ``"gate/up: 4-bit g64, down: 4-bit g32"``."""
    members: dict[str, dict[str, list[str]]] = {}
    for kind, member, description in entries:
        found = members.setdefault(kind, {}).setdefault(member, [])
        if description not in found:
            found.append(description)
    order = {k: i for i, k in enumerate(KIND_ORDER)}
    summary = {}
    for kind in sorted(members, key=lambda k: order.get(k, len(order))):  # stable: appearance
        by_text: dict[str, list[str]] = {}
        # Files list tensors by name; show an MLP's projections in the order they compute.
        ordered = sorted(members[kind].items(), key=lambda m: _PROJECTION_ORDER.get(m[0], 3))
        for member, descriptions in ordered:
            by_text.setdefault(" | ".join(descriptions), []).append(member.removesuffix("_proj"))
        if len(by_text) == 1:
            summary[kind] = next(iter(by_text))
        else:
            summary[kind] = ", ".join(f"{'/'.join(m)}: {text}" for text, m in by_text.items())
    return summary


@dataclass(frozen=True)
class SafetensorsHeader:
    """The header of a safetensors file: its tensor table and where the data starts."""

    tensors: dict  # name -> {"dtype", "shape", "data_offsets"} (offsets relative to data_start)
    data_start: int  # byte offset of the data section: 8 + the header's length
    digest: str  # sha256 of the header's bytes: a fingerprint of the file's layout


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """The header of a safetensors file (8-byte length + JSON), without reading the data; raises
    ``StoreError`` naming the file if the header is malformed or a tensor's data lies past the
    end of the file (a truncated file)."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            size = os.fstat(f.fileno()).st_size
            if length > size - 8:
                raise StoreError(
                    f"{path}: not a safetensors file (header of {length} bytes in a file of {size})"
                )
            raw = f.read(length)
            header = json.loads(raw)
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path}: not a readable safetensors file ({e})") from e
    if not isinstance(header, dict):
        raise StoreError(f"{path}: not a safetensors file (its header is not a table)")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - length
    for name, info in header.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_bytes
        ):
            raise StoreError(
                f"{path}: tensor {name!r} has data offsets {offsets!r} outside the file's "
                f"{data_bytes} data bytes; the file is truncated or corrupt"
            )
    return SafetensorsHeader(header, 8 + length, hashlib.sha256(raw).hexdigest())


def safetensors_header(path: Path) -> dict:
    """The tensor table of a safetensors file (name -> dtype, shape, data_offsets), without
    reading the data; raises ``StoreError`` naming the file if the header is malformed."""
    return read_safetensors_header(path).tensors


def resident_quantization(header: dict, config: dict) -> dict[str, tuple[dict | None, str]]:
    """Module path -> (quantization or None, float dtype) for the resident weights' matrices.

    A module is quantized when it has ``scales`` (as mlx-lm's loader decides); its parameters are
    its own entry in ``config["quantization"]``, else the default there. Float 2-D weights (linear
    layers and embeddings) count as unquantized modules; norms and convolutions are left out.
    """
    q = config.get("quantization") if isinstance(config.get("quantization"), dict) else None
    found = {}
    for name, info in header.items():
        if not name.endswith(".weight"):
            continue
        module = name.removesuffix(".weight")
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"), str(info.get("dtype")))
        if f"{module}.scales" in header:
            found[module] = (module_quantization(q, module), dtype)
        elif len(info.get("shape", ())) == 2:
            found[module] = (None, dtype)
    return found


def quantization_summary(
    store: Path, manifest: Manifest, config: dict, resident_header: dict | None = None
) -> dict[str, str]:
    """Quantization per tensor kind of a store, e.g. ``{"experts": "gate/up: 4-bit g64, down:
    4-bit g32", "attention": "4-bit g64", "embed": "4-bit g64", ...}``; ``resident_header`` is the
    resident weights' tensor table (default: the store's ``model.safetensors``)."""
    entries = []
    for layer in manifest.layers:
        dtypes = {t.name: t.dtype for t in layer.tensors}
        for name in layer.projections:
            q = layer.module_quantization(name)
            entries.append(("experts", name, describe_quantization(q, dtypes[f"{name}.weight"])))
    header = resident_header if resident_header is not None else safetensors_header(store / RESIDENT)
    for module, (q, dtype) in resident_quantization(header, config).items():
        kind, member = tensor_kind(module)
        entries.append((kind, member, describe_quantization(q, dtype)))
    return summarize_kinds(entries)


def summary_lines(summary: dict[str, str]) -> list[str]:
    """``quantization_summary`` as text lines: ``"experts gate/up: 4-bit g64, down: 4-bit g32"``,
    ``"attention: 4-bit g64"``."""
    return [f"{kind} {text}" if ":" in text else f"{kind}: {text}" for kind, text in summary.items()]
