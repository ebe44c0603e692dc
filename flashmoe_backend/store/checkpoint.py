"""A checkpoint directory, and an mlx-community checkpoint read in place: no pack, no copy.

mlx-community checkpoints (what ``mlx_lm.convert`` writes) stack each MoE layer's experts:
``...switch_mlp.{gate,up,down}_proj.{weight,scales,biases}`` of shape ``[E, ...]``. Expert ``e``'s
slice of such a tensor is one contiguous byte range, ``e * (tensor bytes / E)`` past the tensor's
start, which the safetensors header gives (8-byte length + JSON; no tensor data is read).
``Checkpoint`` is the index of those ranges, per layer and expert, served to the expert reader as
``Extent``s (``store/layout.py``): one read per slice, on the same threads, into the same staging
buffers, bypassing the page cache the same way as a packed store's records.

The header names are mapped to the model's parameter paths by mlx-lm itself: the model's own
``sanitize`` runs over lazy placeholders of the header's tensors (no memory), and a tensor it
passes through unchanged keeps its place in the file; experts it has to transform (a Hugging Face
layout) cannot be read in place, and are refused with the advice to pack them.

Integrity, before any token: every shard's header against the file's size (a truncated shard),
every file the shard index lists, every expert tensor present and shaped as the model built from
``config.json`` needs, every resident tensor present; a ``StoreError`` names the file and tensor.
A checkpoint has no checksums of ours, so the CRC32 of each expert slice is recorded on its first
read (trust on first use) in the index cache, ``$FLASHMOE_HOME/checkpoints/`` (never inside the
checkpoint or a Hugging Face snapshot); a later read that differs fails loudly, naming the file,
layer, expert and tensor, instead of giving wrong tokens. ``flashmoe verify`` checks each shard
against the sha256 its Hugging Face blob is named by, where there is one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flashmoe_backend.home import flashmoe_home
from flashmoe_backend.store.format import (
    ALIGNMENT,
    CONFIG,
    TOKENIZER_REQUIRED,
    LayerSpec,
    Manifest,
    SafetensorsHeader,
    StoreError,
    TensorSpec,
    align,
    checksum,
    read_safetensors_header,
    record_layout,
)
from flashmoe_backend.store.layout import Extent

INDEX_FORMAT = "flashmoe-checkpoint-index"
INDEX_VERSION = 1
SHARD_INDEX = "model.safetensors.index.json"
# Persist newly recorded checksums at most this often while reading (and at close / exit).
FLUSH_SECONDS = 30.0
_INT_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "num_experts",
    "num_local_experts",
    "num_experts_per_tok",
    "vocab_size",
)
# safetensors dtype -> (mlx dtype name, bytes per element)
_DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "U32": ("uint32", 4),
    "I32": ("int32", 4),
    "I64": ("int64", 8),
    "U16": ("uint16", 2),
    "I16": ("int16", 2),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "BOOL": ("bool_", 1),
}


# --------------------------------------------------------------------------------------------
# A checkpoint directory (also what ``flashmoe pack`` reads)
# --------------------------------------------------------------------------------------------


def read_checkpoint_config(src: Path) -> dict:
    """The parsed ``config.json`` of a checkpoint directory; ``StoreError`` naming the file and
    field when it is missing, not JSON, or has a malformed ``quantization`` or integer field."""
    path = src / CONFIG
    if not src.is_dir():
        raise StoreError(f"{src}: no such checkpoint directory")
    if not path.is_file():
        raise StoreError(f"{path}: missing; {src} is not a model checkpoint")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise StoreError(f"{path}: must hold a JSON object, not {type(config).__name__}")
    quantization = config.get("quantization")
    if quantization is not None and not (
        isinstance(quantization, dict)
        and all(isinstance(quantization.get(k), int) for k in ("bits", "group_size"))
    ):
        raise StoreError(
            f"{path}: field 'quantization' must be an object with integer 'bits' and "
            f"'group_size', got {quantization!r}"
        )
    _check_config_fields(path, config)
    return config


def _check_config_fields(path: Path, config: dict) -> None:
    """The integer settings of the config (and its ``text_config``) must be integers: a string
    there fails deep inside the model's constructor with a message that names no field."""
    text = config.get("text_config")
    if text is not None and not isinstance(text, dict):
        raise StoreError(f"{path}: field 'text_config' must be an object, got {text!r}")
    for prefix, section in (("", config), ("text_config.", text or {})):
        for name in _INT_FIELDS:
            value = section.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise StoreError(f"{path}: field '{prefix}{name}' must be an integer, got {value!r}")


def build_lazy_model(src: Path, config: dict):
    """The mlx-lm model of ``config`` (lazy: its random initial weights take no memory), refused
    with a ``StoreError`` naming ``config.json`` unless it is an MoE built on SwitchGLU."""
    from mlx_lm.utils import _get_classes

    from flashmoe_backend.experts.switch import find_switch_modules

    model_type = config.get("model_type")
    try:
        model_class, args_class = _get_classes(config)
    except (ValueError, KeyError) as e:
        raise StoreError(
            f"{src / CONFIG}: model_type {model_type!r} is not an architecture mlx-lm knows"
        ) from e
    try:
        model = model_class(args_class.from_dict(config))
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        # A field of the wrong type or a missing one (the message names it).
        raise StoreError(f"{src / CONFIG}: cannot build a {model_type!r} model from it: {e}") from e
    if not find_switch_modules(model):
        raise StoreError(
            f"{src / CONFIG}: model_type {model_type!r} has no MoE experts (no SwitchGLU "
            f"layers); flashmoe streams Mixture-of-Experts models only"
        )
    return model


def check_tokenizer(src: Path) -> None:
    """A checkpoint or store needs one of the tokenizer files."""
    if not any((src / name).is_file() for name in TOKENIZER_REQUIRED):
        raise StoreError(f"{src}: missing tokenizer file (one of {', '.join(TOKENIZER_REQUIRED)})")


def weight_files(src: Path, gone: Collection[str] = ()) -> list[Path]:
    """The checkpoint's weight shards (``model*.safetensors``, what mlx-lm loads), each listed in
    ``model.safetensors.index.json`` present (but those named in ``gone``, deleted on purpose);
    ``StoreError`` naming the missing file (an incomplete download) or the directory without
    any."""
    index = src / SHARD_INDEX
    if index.is_file():
        try:
            listed = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise StoreError(f"{index}: not a valid shard index ({e})") from e
        for name in sorted(listed):
            if not (src / name).is_file() and name not in gone:
                raise StoreError(
                    f"{src / name}: missing, but {SHARD_INDEX} lists it; the checkpoint is "
                    f"incomplete (an interrupted download?)"
                )
    files = sorted(src.glob("model*.safetensors"))
    if not files and not gone:
        raise StoreError(f"{src}: no weight files (model*.safetensors)")
    return files


def check_weight_files(src: Path, gone: Collection[str] = ()) -> list[SafetensorsHeader]:
    """Every shard's header, each checked against its file's size: a truncated or malformed
    shard is named here (MLX's own error names neither the file nor the problem)."""
    return [read_safetensors_header(path) for path in weight_files(src, gone)]


# --------------------------------------------------------------------------------------------
# The in-place expert index
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Slice:
    """Where one tensor of a layer's experts lives: expert ``e`` at ``start + e * stride``."""

    file: int
    start: int
    stride: int
    spec: TensorSpec  # name relative to the SwitchGLU, per-expert shape; offset 0 in its extent
    header_name: str  # the tensor's name in the shard


@dataclass
class _Located:
    """A header tensor: which shard, its entry, and the shard's data start."""

    file: int
    name: str
    info: dict
    data_start: int


def _placeholders(headers: list[SafetensorsHeader]) -> tuple[dict, dict[int, _Located]]:
    """Lazy zero arrays of every header tensor's shape and dtype (no memory is allocated unless
    evaluated), and where each one's tensor lives, by the placeholder's identity."""
    import mlx.core as mx

    arrays, where = {}, {}
    for i, header in enumerate(headers):
        for name, info in header.tensors.items():
            dtype = _DTYPES.get(info.get("dtype"), ("uint8", 1))[0]
            shape = info.get("shape")
            if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
                shape = [0]  # checked below if it is an expert tensor; mlx-lm refuses the rest
            a = mx.zeros(shape, getattr(mx, dtype))
            arrays[name] = a
            where[id(a)] = _Located(i, name, info, header.data_start)
    return arrays, where


def _quantize_like_mlx_lm(switch, path: str, config: dict, weights: dict) -> None:
    """Quantize a SwitchGLU template the way mlx-lm's ``load_model`` quantizes the model: the
    module's own entry in ``config["quantization"]`` if any, else the default, with group size
    and bits inferred from the checkpoint's shapes where it holds ``scales``."""
    import mlx.nn as nn
    from mlx_lm.utils import infer_quant_config

    quantization = config.get("quantization")
    if quantization is None:
        return

    def predicate(p: str, m) -> dict | bool:
        full = f"{path}.{p}"
        if full in quantization:
            return quantization[full]
        if not hasattr(m, "to_quantized") or f"{full}.scales" not in weights:
            return False
        return infer_quant_config(full, m, weights)

    nn.quantize(
        switch,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


class Checkpoint:
    """An mlx-community checkpoint read in place: an ``ExpertSource`` (``store/layout.py``).

    Open one with ``Checkpoint.open(directory)``; every check is done there, before any token.
    """

    def __init__(
        self,
        root: Path,
        config: dict,
        files: list[Path],
        layers: list[LayerSpec],
        slices: list[list[_Slice]],
        resident: dict,
        index: dict,
        index_dir: Path | None,
    ):
        self.root = root
        self.config = config
        self.files = files
        self.manifest = Manifest(model_type=config["model_type"], layers=layers, tokenizer_files=[])
        self._slices = slices
        self._resident = resident
        self._index_json = json.dumps(index, indent=1, sort_keys=True)
        self.index_dir = index_dir
        self.checksums = FirstReadChecksums(
            index_dir, [len(s) * layer.num_experts for s, layer in zip(slices, layers, strict=True)],
            hashlib.sha256(self._index_json.encode()).hexdigest(),
        )
        # Written at exit or when this object goes away, even if nobody calls flush().
        weakref.finalize(self, self.checksums.flush)

    @classmethod
    def open(cls, root: Path, *, index_home: Path | None = None) -> Checkpoint:
        """Index the checkpoint at ``root`` from its safetensors headers and check it.

        ``index_home`` is where the index cache lives (default ``$FLASHMOE_HOME``). Raises
        ``StoreError`` naming the file (and tensor or field) at fault: a config mlx-lm cannot
        build an MoE from, no tokenizer, a missing or truncated shard, an expert tensor missing,
        not stacked or shaped unlike the config says, a resident tensor missing, or a shard
        whose header changed since this checkpoint's first use.
        """
        from mlx.utils import tree_flatten

        from flashmoe_backend.experts.switch import find_switch_modules, switch_quantization

        root = Path(root)
        config = read_checkpoint_config(root)
        model = build_lazy_model(root, config)
        check_tokenizer(root)
        files = weight_files(root)
        headers = [read_safetensors_header(path) for path in files]
        arrays, where = _placeholders(headers)
        weights = model.sanitize(dict(arrays)) if hasattr(model, "sanitize") else arrays
        del arrays
        switches = find_switch_modules(model)
        layers, slices = [], []
        for path, switch in switches:
            _quantize_like_mlx_lm(switch, path, config, weights)
            layer_slices = [
                _locate(root, files, path, name, param, weights, where)
                for name, param in sorted(tree_flatten(switch.parameters()))
            ]
            tensors, record_bytes = record_layout(
                {s.spec.name: (s.spec.dtype, s.spec.shape, s.spec.nbytes) for s in layer_slices}
            )
            num_experts = {param.shape[0] for _, param in tree_flatten(switch.parameters())}.pop()
            layers.append(
                LayerSpec(
                    module=path,
                    file=files[layer_slices[0].file].name,
                    num_experts=num_experts,
                    record_bytes=record_bytes,
                    tensors=tensors,
                    quantization=switch_quantization(switch),
                )
            )
            slices.append(layer_slices)
        expert_prefixes = tuple(f"{path}." for path, _ in switches)
        _check_resident(root, files, model, expert_prefixes, weights)
        resident = {
            k: where[id(v)].info
            for k, v in weights.items()
            if not k.startswith(expert_prefixes) and id(v) in where
        }
        index = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "root": str(root.resolve()),
            "shards": [
                {"file": p.name, "size": p.stat().st_size, "header_sha256": h.digest}
                for p, h in zip(files, headers, strict=True)
            ],
            "layers": [
                {
                    "module": layer.module,
                    "num_experts": layer.num_experts,
                    "tensors": [
                        {
                            "name": s.spec.name,
                            "file": files[s.file].name,
                            "start": s.start,
                            "stride": s.stride,
                            "dtype": s.spec.dtype,
                            "shape": list(s.spec.shape),
                        }
                        for s in layer_slices
                    ],
                }
                for layer, layer_slices in zip(layers, slices, strict=True)
            ],
        }
        index_dir = _index_dir(root, index_home)
        index_dir = _sync_index(index_dir, index, files)
        return cls(root, config, files, layers, slices, resident, index, index_dir)

    # -- ExpertSource ---------------------------------------------------------------------------

    def extents(self, layer: int, expert: int) -> list[Extent]:
        """One extent per tensor slice: stacked tensors keep an expert's slices apart (each tensor
        holds every expert's slice of it), so there is nothing to merge."""
        return [Extent(s.file, s.start + expert * s.stride, s.stride, (s.spec,)) for s in self._slices[layer]]

    def staging_bytes(self, layer: int) -> int:
        # Each slice read as its aligned superset: at most one alignment unit more than its
        # aligned length, whatever the slice's offset.
        return sum(align(s.stride) + ALIGNMENT for s in self._slices[layer])

    def check(self, layer: int, expert: int, extent: int, crc: int) -> None:
        recorded = self.checksums.check(layer, expert, extent, len(self._slices[layer]), crc)
        if recorded is not None:
            s = self._slices[layer][extent]
            offset = s.start + expert * s.stride
            where = self.checksums.path or "in this process: the index cache is not writable"
            raise StoreError(
                f"{self.files[s.file]}: expert {expert} of layer {layer} "
                f"({self.manifest.layers[layer].module}), tensor {s.header_name} bytes "
                f"{offset}..{offset + s.stride}: CRC32 {crc:08x} differs from {recorded:08x} recorded "
                f"on its first read ({where}); the file changed since flashmoe first "
                f"read it: re-download it (`flashmoe verify {self.root}` checks a Hugging Face "
                f"download against its sha256)"
            )

    def resident_header(self) -> dict:
        return self._resident

    def resident_bytes(self) -> int:
        return sum(info["data_offsets"][1] - info["data_offsets"][0] for info in self._resident.values())

    def fingerprint(self) -> bytes:
        return self._index_json.encode()

    def flush(self) -> None:
        self.checksums.flush()

    # -- verify ---------------------------------------------------------------------------------

    def recorded_slices(self) -> list[tuple[int, int, int]]:
        """``(layer, expert, slice)`` of every slice with a recorded CRC32."""
        return self.checksums.known_slices([len(s) for s in self._slices])

    def verify_recorded(self, on_bytes: Callable[[int], None] | None = None) -> tuple[int, list[str]]:
        """Re-read every slice with a recorded CRC32 and compare; returns how many were checked
        and a line per mismatch (file, layer, expert, tensor)."""
        bad, count = [], 0
        fds: dict[int, int] = {}
        try:
            for layer, expert, k in self.recorded_slices():
                s = self._slices[layer][k]
                fd = fds.get(s.file)
                if fd is None:
                    fd = fds[s.file] = os.open(self.files[s.file], os.O_RDONLY)
                offset = s.start + expert * s.stride
                data = os.pread(fd, s.stride, offset)
                count += 1
                try:
                    self.check(layer, expert, k, checksum(data) if len(data) == s.stride else -1)
                except StoreError as e:
                    bad.append(str(e))
                if on_bytes is not None:
                    on_bytes(s.stride)
        finally:
            for fd in fds.values():
                os.close(fd)
        return count, bad


def _locate(
    root: Path, files: list[Path], module: str, name: str, param, weights: dict, where: dict
) -> _Slice:
    """The slices of one expert tensor (``module.name``), checked against what the model built
    from config.json needs (``param``: its stacked ``[E, ...]`` parameter)."""
    key = f"{module}.{name}"
    value = weights.get(key)
    if value is None:
        raise StoreError(
            f"{root}: tensor {key} (an expert tensor of the model config.json describes) is in none "
            f"of the weight files ({', '.join(p.name for p in files)}); the checkpoint is incomplete "
            f"or of another model"
        )
    located = where.get(id(value))
    if located is None:
        raise StoreError(
            f"{root}: the experts of {module} are not stored stacked as mlx-community checkpoints "
            f"store them (`{key}` [E, ...]), so they cannot be read in place; pack the checkpoint "
            f"with `flashmoe pack {root} STORE` and load the store"
        )
    path, info = files[located.file], located.info
    dtype, itemsize = _DTYPES.get(info.get("dtype"), (None, 0))
    shape = tuple(info.get("shape") or ())
    expected = tuple(param.shape)
    want = str(param.dtype).removeprefix("mlx.core.")
    if name.endswith(".weight") and dtype == "uint32" and want != "uint32":
        # Packed weights without their scales: mlx-lm (so the model here) took it for float.
        scales = key.removesuffix(".weight") + ".scales"
        raise StoreError(
            f"{path}: tensor {located.name} is quantized (uint32) but tensor {scales} (mlx-lm's "
            f"name) is in none of the weight files ({', '.join(p.name for p in files)}); the "
            f"checkpoint is incomplete"
        )
    if shape != expected:
        raise StoreError(
            f"{path}: tensor {located.name} has shape {list(shape)} but {root / CONFIG} describes "
            f"{list(expected)} (num_experts, hidden_size, moe_intermediate_size and quantization "
            f"decide it); the header disagrees with config.json"
        )
    if dtype is None or (want == "uint32") != (dtype == "uint32"):
        raise StoreError(
            f"{path}: tensor {located.name} has dtype {info.get('dtype')} but {root / CONFIG}'s "
            f"quantization needs {'packed uint32 weights' if want == 'uint32' else 'a float tensor'}"
        )
    start, end = info["data_offsets"]
    if end - start != math.prod(shape) * itemsize:
        raise StoreError(
            f"{path}: tensor {located.name} spans {end - start} bytes, not the {math.prod(shape) * itemsize} "
            f"its shape {list(shape)} and dtype {info['dtype']} take; the header is corrupt"
        )
    stride = (end - start) // shape[0]
    spec = TensorSpec(name, dtype, shape[1:], 0, stride)
    return _Slice(located.file, located.data_start + start, stride, spec, located.name)


def _check_resident(root: Path, files: list[Path], model, expert_prefixes: tuple, weights: dict) -> None:
    """Every resident parameter of the model must be in some shard (mlx-lm would fail later,
    naming neither the file nor the checkpoint)."""
    from mlx.utils import tree_flatten

    for name, _ in tree_flatten(model.parameters()):
        if not name.startswith(expert_prefixes) and name not in weights:
            raise StoreError(
                f"{root}: tensor {name} is in none of the weight files "
                f"({', '.join(p.name for p in files)}); the checkpoint is incomplete or of another model"
            )


# --------------------------------------------------------------------------------------------
# The index cache and the first-read checksums
# --------------------------------------------------------------------------------------------


def _index_dir(root: Path, home: Path | None) -> Path:
    """The index cache directory of one checkpoint: by the digest of its resolved path."""
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:24]
    return (home if home is not None else flashmoe_home()) / "checkpoints" / key


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _sync_index(index_dir: Path, index: dict, files: list[Path]) -> Path | None:
    """Compare the index with the one recorded at this checkpoint's first use (or record it);
    returns the directory, or None (with a warning) where it cannot be written: the checksums
    are then kept for this process only."""
    import warnings

    path = index_dir / "index.json"
    if path.is_file():
        try:
            before = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            before = None  # a damaged cache entry: start it again
        if isinstance(before, dict) and before.get("version") == INDEX_VERSION:
            old = {s.get("file"): s for s in before.get("shards", []) if isinstance(s, dict)}
            for shard, p in zip(index["shards"], files, strict=True):
                was = old.get(shard["file"])
                if was is not None and was != shard:
                    raise StoreError(
                        f"{p}: changed since flashmoe first read this checkpoint (size or header differ "
                        f"from those recorded in {path}); its recorded checksums no longer apply. If "
                        f"you replaced it on purpose, delete {index_dir} and load again"
                    )
            if before == index:
                return index_dir
    try:
        index_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, json.dumps(index, indent=1, sort_keys=True).encode())
    except OSError as e:
        warnings.warn(
            f"cannot write the checkpoint index to {index_dir} ({e}): first-read checksums are kept "
            f"for this process only; set FLASHMOE_HOME to a writable directory",
            stacklevel=3,
        )
        return None
    return index_dir


@dataclass
class FirstReadChecksums:
    """The CRC32 of every expert slice, recorded on its first read (trust on first use).

    Kept as ``crc32.npz`` beside the index (4 bytes + 1 flag per slice: 1.4 MB for every slice of
    Qwen3.5-397B, written only as slices are read); valid only with the index it was recorded
    under (``index_digest``). Thread-safe: reader threads record and check concurrently.
    """

    directory: Path | None
    counts: list[int]  # slices per layer (experts x tensors)
    index_digest: str
    crc: np.ndarray = field(init=False)
    known: np.ndarray = field(init=False)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _dirty: bool = field(init=False, default=False)
    _flushed: float = field(init=False, default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self._base = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        total = int(self._base[-1])
        self.crc = np.zeros(total, dtype=np.uint32)
        self.known = np.zeros(total, dtype=bool)
        on_disk = self._load()
        if on_disk is not None:
            self.crc[:], self.known[:] = on_disk

    @property
    def path(self) -> Path | None:
        return None if self.directory is None else self.directory / "crc32.npz"

    def _load(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self.path is None or not self.path.is_file():
            return None
        try:
            with np.load(self.path) as data:
                if str(data["index_digest"]) != self.index_digest or data["crc"].shape != self.crc.shape:
                    return None
                return data["crc"].astype(np.uint32), data["known"].astype(bool)
        except (OSError, ValueError, KeyError):
            return None  # a damaged cache file: record again

    def check(self, layer: int, expert: int, extent: int, per_expert: int, crc: int) -> int | None:
        """Record ``crc`` for the slice if none is recorded; returns the recorded CRC32 when it
        differs from ``crc``, else None."""
        i = int(self._base[layer]) + expert * per_expert + extent
        with self._lock:
            if self.known[i]:
                return None if int(self.crc[i]) == crc else int(self.crc[i])
            self.crc[i], self.known[i], self._dirty = crc, True, True
            flush = time.monotonic() - self._flushed > FLUSH_SECONDS
        if flush:
            self.flush()
        return None

    def known_slices(self, per_expert: list[int]) -> list[tuple[int, int, int]]:
        out = []
        for layer, n in enumerate(per_expert):
            lo, hi = int(self._base[layer]), int(self._base[layer + 1])
            for i in np.nonzero(self.known[lo:hi])[0]:
                out.append((layer, int(i) // n, int(i) % n))
        return out

    def flush(self) -> None:
        """Write the recorded checksums (merged with those another process wrote meanwhile)."""
        with self._lock:
            if not self._dirty or self.path is None:
                return
            on_disk = self._load()
            if on_disk is not None:
                theirs = on_disk[1] & ~self.known
                self.crc[theirs], self.known[theirs] = on_disk[0][theirs], True
            crc, known = self.crc.copy(), self.known.copy()
            self._dirty, self._flushed = False, time.monotonic()
        try:
            import io

            buffer = io.BytesIO()
            np.savez(buffer, crc=crc, known=known, index_digest=np.array(self.index_digest))
            _atomic_write(self.path, buffer.getvalue())
        except OSError:
            pass  # the cache is best effort: the checksums stay in memory for this process


# --------------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------------


@dataclass
class CheckpointVerifyReport:
    """Result of ``verify_checkpoint``: what was checked, and a line per problem found."""

    shards: int  # weight files
    hashed: int  # of them, checked against the sha256 their Hugging Face blob is named by
    slices: int  # expert slices checked against their first-read CRC32
    bytes: int  # bytes read
    bad: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad


def _sha256(path: Path, on_bytes: Callable[[int], None]) -> str:
    """sha256 of a file, read in large chunks and dropped from the page cache behind the read
    (hashing a 209 GB checkpoint must not evict everything else)."""
    h = hashlib.sha256()
    chunk = bytearray(16 << 20)
    view = memoryview(chunk)
    with open(path, "rb", buffering=0) as f:
        done = 0
        while n := f.readinto(chunk):
            h.update(view[:n])  # hashlib releases the GIL on large buffers
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), done, n, os.POSIX_FADV_DONTNEED)
            done += n
            on_bytes(n)
    return h.hexdigest()


def verify_checkpoint(root: Path, progress: bool = False) -> CheckpointVerifyReport:
    """Check a checkpoint read in place: its structure (``Checkpoint.open``), each shard against
    the sha256 its Hugging Face blob is named by where there is one (a file in a Hugging Face
    cache snapshot), and each expert slice with a first-read CRC32 against it."""
    from tqdm import tqdm

    from flashmoe_backend.store.hub import blob_sha256

    checkpoint = Checkpoint.open(root)
    expected = {p: blob_sha256(p) for p in checkpoint.files}
    total = sum(p.stat().st_size for p, sha in expected.items() if sha)
    recorded = checkpoint.recorded_slices()
    total += sum(checkpoint._slices[layer][k].stride for layer, _, k in recorded)
    report = CheckpointVerifyReport(len(checkpoint.files), 0, 0, 0)
    with tqdm(total=total, disable=not progress, unit="B", unit_scale=True, desc="verify") as bar:

        def count(n: int) -> None:
            report.bytes += n
            bar.update(n)

        for path, sha in expected.items():
            if sha is None:
                continue
            actual = _sha256(path, count)
            report.hashed += 1
            if actual != sha:
                report.bad.append(
                    f"{path}: sha256 {actual} differs from {sha}, the one its Hugging Face blob is "
                    f"named by; re-download it (`flashmoe download`)"
                )
        report.slices, bad = checkpoint.verify_recorded(count)
        report.bad.extend(bad)
    return report
