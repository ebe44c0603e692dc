"""Packing: turn a local checkpoint into a streaming store.

Sources are Hugging Face checkpoints (float safetensors, any expert layout mlx-lm's
``sanitize`` understands: fused ``gate_up_proj``, one tensor per expert, ...) and mlx-community
checkpoints (already quantized, stacked ``switch_mlp``; their experts are copied as they are).
The conversion is mlx-lm's own (load lazily, cast, ``quantize_model``), so a store holds the
same weights as ``mlx_lm.convert`` would write; only the layout differs.

MLX loads safetensors lazily: evaluating one layer's experts reads only that layer, so packing
a checkpoint bigger than memory holds one layer of experts at a time. The store is built in a
temporary sibling directory and renamed into place at the end: an interrupted pack leaves
nothing at the destination.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path
from mlx_lm.utils import _get_classes, load_model, quantize_model, save_config
from tqdm import tqdm

from .store import (
    CONFIG,
    MANIFEST,
    RESIDENT,
    TOKENIZER_FILES,
    TOKENIZER_REQUIRED,
    LayerSpec,
    Manifest,
    StoreError,
    checksum,
    record_layout,
)
from .streaming import find_switch_modules

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8, 16)
_CONVERSION_DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class PackOptions:
    """What to pack into. ``bits=16`` keeps float experts (no quantization)."""

    bits: int = 4
    group_size: int = 64
    dtype: str | None = None  # float dtype of unquantized weights; default: the checkpoint's
    progress: bool = True


def _read_source_config(src: Path) -> dict:
    path = src / CONFIG
    if not src.is_dir():
        raise StoreError(f"{src}: no such checkpoint directory")
    if not path.is_file():
        raise StoreError(f"{path}: missing; {src} is not a model checkpoint")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}: not valid JSON ({e})") from e


def _check_architecture(src: Path, config: dict) -> None:
    """Refuse, before reading any weight, what is not an mlx-lm MoE built on SwitchGLU."""
    model_type = config.get("model_type")
    try:
        model_class, args_class = _get_classes(config)
    except (ValueError, KeyError) as e:
        raise StoreError(
            f"{src / CONFIG}: model_type {model_type!r} is not an architecture mlx-lm knows"
        ) from e
    if not find_switch_modules(model_class(args_class.from_dict(config))):  # lazy: no memory
        raise StoreError(
            f"{src / CONFIG}: model_type {model_type!r} has no MoE experts (no SwitchGLU "
            f"layers); flashmoe streams Mixture-of-Experts models only"
        )


def _load_source(src: Path) -> tuple[nn.Module, dict]:
    try:
        return load_model(src, lazy=True, strict=True)
    except (ValueError, FileNotFoundError) as e:
        raise StoreError(f"{src}: cannot load the checkpoint with mlx-lm: {e}") from e


def _conversion_dtype(config: dict, requested: str | None) -> str | None:
    """The dtype mlx_lm.convert would cast float weights to (same lookup order)."""
    dtype = requested or config.get("torch_dtype")
    if dtype is None and (text := config.get("text_config")):
        dtype = text.get("dtype")
    return dtype if dtype in _CONVERSION_DTYPES else None


def _cast(model: nn.Module, dtype: str) -> None:
    target = getattr(mx, dtype)
    keep = getattr(model, "cast_predicate", lambda _: True)

    def cast(path, value):
        if keep(path) and mx.issubdtype(value.dtype, mx.floating):
            return value.astype(target)
        return value

    model.update(tree_map_with_path(cast, model.parameters()))


def _prepare(model: nn.Module, config: dict, options: PackOptions, src: Path) -> dict:
    """Cast and quantize (lazily) like mlx_lm.convert; returns the store's config."""
    if options.bits not in SUPPORTED_BITS:
        raise StoreError(f"--bits {options.bits} is not supported; choose one of {SUPPORTED_BITS}")
    if "quantization" in config:
        source_bits = config["quantization"].get("bits")
        if options.bits not in (16, source_bits):
            raise StoreError(
                f"{src / CONFIG}: the checkpoint is already quantized at {source_bits} bits; "
                f"re-quantizing to {options.bits} bits is not supported (omit --bits or use "
                f"--bits {source_bits})"
            )
        if options.dtype:
            _cast(model, options.dtype)
        return config
    dtype = _conversion_dtype(config, options.dtype)
    if dtype:
        _cast(model, dtype)
    if options.bits == 16:
        return config
    model, config = quantize_model(model, config, options.group_size, options.bits)
    return config


def _quantization_of(switch: nn.Module) -> dict | None:
    params = {
        (m.group_size, m.bits, m.mode)
        for _, m in switch.named_modules()
        if hasattr(m, "bits") and hasattr(m, "group_size")
    }
    if not params:
        return None
    if len(params) > 1:
        raise StoreError(f"experts of one layer quantized differently ({params}); unsupported")
    group_size, bits, mode = params.pop()
    return {"group_size": group_size, "bits": bits, "mode": mode}


def _host_view(array: mx.array) -> np.ndarray:
    """Exact bytes of an MLX array as numpy (bfloat16 travels as uint16)."""
    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    return np.array(array, copy=False)


def _write_layer(path: str, switch: nn.Module, out: Path) -> LayerSpec:
    """Evaluate one layer's experts and write them as aligned records; then free them."""
    params = dict(tree_flatten(switch.parameters()))
    mx.eval(params)
    host = {name: _host_view(a) for name, a in params.items()}
    num_experts = {a.shape[0] for a in host.values()}
    if len(num_experts) != 1:
        raise StoreError(f"{path}: expert tensors disagree on the number of experts")
    (count,) = num_experts
    layout = {
        name: (str(params[name].dtype).removeprefix("mlx.core."), a.shape[1:], a[0].nbytes)
        for name, a in host.items()
    }
    tensors, record_bytes = record_layout(layout)
    record = np.zeros(record_bytes, dtype=np.uint8)
    checksums = []
    with open(out, "wb") as f:
        for e in range(count):
            for t in tensors:
                record[t.offset : t.offset + t.nbytes] = host[t.name][e].reshape(-1).view(np.uint8)
            checksums.append(checksum(record))
            f.write(record.data)
        f.flush()
        os.fsync(f.fileno())
    quantization = _quantization_of(switch)
    # Drop this layer's weights now: the next layer must not find them still in memory.
    switch.update(tree_map_with_path(lambda *_: mx.array([]), switch.parameters()))
    return LayerSpec(
        module=path,
        file=f"experts/{out.name}",
        num_experts=count,
        record_bytes=record_bytes,
        tensors=tensors,
        quantization=quantization,
        checksums=checksums,
    )


def _copy_tokenizer(src: Path, dst: Path) -> list[str]:
    if not any((src / name).is_file() for name in TOKENIZER_REQUIRED):
        raise StoreError(f"{src}: missing tokenizer file (one of {', '.join(TOKENIZER_REQUIRED)})")
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pack(src: Path | str, dst: Path | str, options: PackOptions = PackOptions()) -> Manifest:
    """Pack the checkpoint at ``src`` into a new store at ``dst`` (which must not exist)."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if dst.exists():
        raise StoreError(f"{dst}: already exists; remove it or choose another destination")
    config = _read_source_config(src)
    _check_architecture(src, config)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        tokenizer_files = _copy_tokenizer(src, tmp)
        model, config = _load_source(src)
        switches = find_switch_modules(model)
        config = _prepare(model, config, options, src)
        (tmp / "experts").mkdir()
        layers = []
        for i, (path, switch) in enumerate(
            tqdm(switches, desc="pack experts", unit="layer", disable=not options.progress)
        ):
            layers.append(_write_layer(path, switch, tmp / "experts" / f"layer_{i:03d}.bin"))
        skip = tuple(f"{path}." for path, _ in switches)
        resident = {k: v for k, v in tree_flatten(model.parameters()) if not k.startswith(skip)}
        mx.save_safetensors(str(tmp / RESIDENT), resident, metadata={"format": "mlx"})
        save_config(config, tmp / CONFIG)
        manifest = Manifest(
            model_type=config["model_type"], layers=layers, tokenizer_files=tokenizer_files
        )
        (tmp / MANIFEST).write_text(manifest.to_json())  # written last: its presence means done
        _fsync_dir(tmp)
        os.rename(tmp, dst)
        _fsync_dir(dst.parent)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
