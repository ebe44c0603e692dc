"""Packing: turn a local checkpoint into a streaming store.

Sources are Hugging Face checkpoints (float safetensors, any expert layout mlx-lm's
``sanitize`` understands: fused ``gate_up_proj``, one tensor per expert, ...) and mlx-community
checkpoints (already quantized, stacked ``switch_mlp``; their experts are copied as they are).
The conversion is mlx-lm's own (load lazily, cast, ``quantize_model``), so a store holds the
same weights as ``mlx_lm.convert`` would write; only the layout differs.

Quantization is chosen per tensor: a matrix whose input size the requested group size does not
divide gets the largest group size MLX supports that does (or stays in float if none does),
instead of mlx-lm's silent float fallback that a store recording one quantization per layer
cannot load. The choice is recorded per module in ``config.json`` (mlx-lm's per-layer
quantization config, written by ``quantize_model`` itself) and per projection in the manifest,
and pack prints one line per tensor kind that did not get the requested quantization.

MLX loads safetensors lazily: evaluating one layer's experts reads only that layer, so packing
a checkpoint bigger than memory holds one layer of experts at a time. The converted weights'
shapes are known before anything is evaluated, so the store's size is computed, and checked
against the destination's free space, before anything is written. The store is built in a
temporary sibling directory and renamed into place at the end: an interrupted pack leaves
nothing at the destination.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path
from mlx_lm.utils import _get_classes, load_model, quantize_model, save_config
from tqdm import tqdm

from flashmoe_backend.experts.switch import find_switch_modules
from flashmoe_backend.store.format import (
    CONFIG,
    KIND_ORDER,
    MANIFEST,
    RESIDENT,
    TOKENIZER_FILES,
    TOKENIZER_REQUIRED,
    LayerSpec,
    Manifest,
    StoreError,
    TensorSpec,
    checksum,
    describe_quantization,
    layer_quantization,
    record_layout,
    required_version,
    safetensors_header,
    tensor_kind,
)

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8, 16)
GROUP_SIZES = (32, 64, 128)  # the group sizes MLX's affine quantization supports
CONVERSION_DTYPES = ("float16", "bfloat16", "float32")
GiB = 1024**3
# Room for what the size estimate leaves out: safetensors headers, config and manifest JSON.
_HEADROOM_BYTES = 1 << 20
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


@dataclass(frozen=True)
class PackOptions:
    """What to pack into. ``bits=16`` keeps float experts (no quantization)."""

    bits: int = 4
    group_size: int = 64
    dtype: str | None = None  # float dtype of unquantized weights; default: the checkpoint's
    progress: bool = True


class PlannedQuantization(NamedTuple):
    """What one module was asked to be quantized with, and what it gets."""

    requested: dict  # {"group_size", "bits", "mode"}: the options, or the model's own choice
    chosen: dict | None  # the same with a group size that divides the input size; None: float
    in_dims: int


def _check_options(options: PackOptions) -> None:
    """Refuse bad options before reading anything."""
    if options.bits not in SUPPORTED_BITS:
        raise StoreError(f"--bits {options.bits} is not supported; choose one of {SUPPORTED_BITS}")
    if options.bits != 16 and options.group_size not in GROUP_SIZES:
        raise StoreError(
            f"--group-size {options.group_size} is not supported; choose one of {GROUP_SIZES} "
            f"(the group sizes MLX quantizes with)"
        )
    if options.dtype is not None and options.dtype not in CONVERSION_DTYPES:
        raise StoreError(
            f"--dtype {options.dtype!r} is not supported; choose one of {', '.join(CONVERSION_DTYPES)}"
        )


def _read_source_config(src: Path) -> dict:
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


def _check_architecture(src: Path, config: dict) -> None:
    """Refuse, before reading any weight, what is not an mlx-lm MoE built on SwitchGLU."""
    model_type = config.get("model_type")
    try:
        model_class, args_class = _get_classes(config)
    except (ValueError, KeyError) as e:
        raise StoreError(
            f"{src / CONFIG}: model_type {model_type!r} is not an architecture mlx-lm knows"
        ) from e
    try:
        model = model_class(args_class.from_dict(config))  # lazy: no memory
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        # A field of the wrong type or a missing one (the message names it).
        raise StoreError(f"{src / CONFIG}: cannot build a {model_type!r} model from it: {e}") from e
    if not find_switch_modules(model):
        raise StoreError(
            f"{src / CONFIG}: model_type {model_type!r} has no MoE experts (no SwitchGLU "
            f"layers); flashmoe streams Mixture-of-Experts models only"
        )


def _check_weight_files(src: Path) -> None:
    """Name the weight file whose header is unreadable or points past its end (MLX's own error
    names neither the file nor, for a bad header, the problem)."""
    for path in sorted(src.glob("model*.safetensors")):
        safetensors_header(path)


def _load_source(src: Path) -> tuple[nn.Module, dict]:
    _check_weight_files(src)
    try:
        return load_model(src, lazy=True, strict=True)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise StoreError(f"{src}: cannot load the checkpoint with mlx-lm: {e}") from e
    except KeyError as e:  # a model's sanitize looked for a tensor the checkpoint lacks
        raise StoreError(
            f"{src}: cannot load the checkpoint with mlx-lm: tensor {e} (mlx-lm's name) is "
            f"missing from the weight files"
        ) from e


def _conversion_dtype(config: dict, requested: str | None) -> str | None:
    """The dtype mlx_lm.convert would cast float weights to (same lookup order)."""
    dtype = requested or config.get("torch_dtype")
    if dtype is None and (text := config.get("text_config")):
        dtype = text.get("dtype")
    return dtype if dtype in CONVERSION_DTYPES else None


def _cast(model: nn.Module, dtype: str) -> None:
    target = getattr(mx, dtype)
    keep = getattr(model, "cast_predicate", lambda _: True)

    def cast(path, value):
        if keep(path) and mx.issubdtype(value.dtype, mx.floating):
            return value.astype(target)
        return value

    model.update(tree_map_with_path(cast, model.parameters()))


def choose_group_size(in_dims: int, preferred: int, mode: str = "affine") -> int | None:
    """The group size to quantize a matrix of ``in_dims`` inputs with: ``preferred`` if it divides
    ``in_dims``, else (affine mode) the largest of ``GROUP_SIZES`` that does; None if none does."""
    candidates = (preferred, *sorted(GROUP_SIZES, reverse=True)) if mode == "affine" else (preferred,)
    return next((g for g in candidates if in_dims % g == 0), None)


def plan_quantization(model: nn.Module, bits: int, group_size: int) -> dict[str, PlannedQuantization]:
    """The quantization of every module that mlx-lm would quantize (it has ``to_quantized`` and
    the model's ``quant_predicate`` accepts it), with a group size its input size allows."""
    predicate = getattr(model, "quant_predicate", None)
    default = {"group_size": group_size, "bits": bits, "mode": "affine"}
    plan = {}
    for path, module in model.named_modules():
        if not hasattr(module, "to_quantized") or "weight" not in module:
            continue
        wanted = predicate(path, module) if predicate is not None else True
        if not wanted:
            continue  # the model keeps it in float on purpose (mlx-lm records nothing)
        requested = {**default, **wanted} if isinstance(wanted, dict) else dict(default)
        in_dims = module.weight.shape[-1]
        group = choose_group_size(in_dims, requested["group_size"], requested["mode"])
        chosen = None if group is None else {**requested, "group_size": group}
        plan[path] = PlannedQuantization(requested, chosen, in_dims)
    return plan


def _quantize(
    model: nn.Module, config: dict, plan: dict[str, PlannedQuantization], options: PackOptions
) -> dict:
    """Quantize as planned with mlx-lm's ``quantize_model``, one pass per group size, the requested
    one first. ``quantize_model`` skips every module its group size does not divide, so one pass
    cannot fall back; the first pass writes the config's default, and the later ones find the
    model partly quantized and so record what they quantize per module path, which is how mlx-lm
    writes mixed quantization. Modules kept in float are recorded as ``False``, which mlx-lm's
    loader reads as "do not quantize". Returns the store's config."""
    groups = [options.group_size]
    groups += sorted({p.chosen["group_size"] for p in plan.values() if p.chosen} - set(groups))
    for i, group in enumerate(groups):
        default = {"group_size": group, "bits": options.bits, "mode": "affine"}

        def predicate(path: str, _module: nn.Module, group: int = group, default: dict = default):
            planned = plan.get(path)
            if planned is None or planned.chosen is None or planned.chosen["group_size"] != group:
                return False
            return True if planned.chosen == default else dict(planned.chosen)

        # quantize_model prints the bits per weight after each pass: only the last one is final.
        with contextlib.redirect_stdout(io.StringIO()) if i < len(groups) - 1 else contextlib.nullcontext():
            model, config = quantize_model(model, config, group, options.bits, quant_predicate=predicate)
    quantization = config["quantization"]
    quantization.update({path: False for path, p in plan.items() if p.chosen is None})
    config["quantization_config"] = quantization
    return config


def fallback_notices(plan: dict[str, PlannedQuantization], experts: Collection[str] = ()) -> list[str]:
    """One line per tensor kind (see ``tensor_kind``) that did not get the requested quantization."""
    found: dict[tuple[str, str, str], list[int]] = {}
    for path, p in plan.items():
        if p.chosen == p.requested:
            continue
        kind, member = tensor_kind(path, experts)
        if p.chosen is None:
            outcome = (
                f"is not a multiple of any group size MLX supports ({', '.join(map(str, GROUP_SIZES))}); "
                f"kept unquantized"
            )
        else:
            outcome = (
                f"is not a multiple of group size {p.requested['group_size']}; quantized "
                f"{describe_quantization(p.chosen)} instead"
            )
        found.setdefault((kind, member, outcome), []).append(p.in_dims)
    order = {kind: i for i, kind in enumerate(KIND_ORDER)}
    return [
        f"flashmoe pack: {kind} {member}: input size {'/'.join(map(str, sorted(set(dims))))} "
        f"{outcome} ({len(dims)} module{'s' if len(dims) > 1 else ''})"
        for (kind, member, outcome), dims in sorted(
            found.items(), key=lambda f: order.get(f[0][0], len(order))
        )
    ]


def _prepare(
    model: nn.Module, config: dict, options: PackOptions, src: Path
) -> tuple[dict, dict[str, PlannedQuantization]]:
    """Cast and quantize (lazily) like mlx_lm.convert; returns the store's config and the plan
    of what was quantized how (empty when nothing is quantized here)."""
    if "quantization" in config:
        source_bits = config["quantization"]["bits"]
        if options.bits not in (16, source_bits):
            raise StoreError(
                f"{src / CONFIG}: the checkpoint is already quantized at {source_bits} bits; "
                f"re-quantizing to {options.bits} bits is not supported (omit --bits or use "
                f"--bits {source_bits})"
            )
        if options.dtype:
            _cast(model, options.dtype)
        return config, {}
    dtype = _conversion_dtype(config, options.dtype)
    if dtype:
        _cast(model, dtype)
    if options.bits == 16:
        return config, {}
    plan = plan_quantization(model, options.bits, options.group_size)
    return _quantize(model, config, plan, options), plan


def _switch_quantization(switch: nn.Module) -> dict | None:
    """The manifest's ``quantization`` of one layer's experts, from each projection's own."""
    per_module = {
        name: {"group_size": m.group_size, "bits": m.bits, "mode": m.mode} if "scales" in m else None
        for name, m in switch.named_modules()
        if name and "weight" in m
    }
    return layer_quantization(per_module)


def _layout(params: dict[str, mx.array]) -> tuple[list[TensorSpec], int]:
    """Record layout of one expert of these stacked ``[E, ...]`` tensors."""
    return record_layout(
        {
            name: (str(a.dtype).removeprefix("mlx.core."), a.shape[1:], a.nbytes // a.shape[0])
            for name, a in params.items()
        }
    )


def estimate_store_bytes(model: nn.Module, switches: list[tuple[str, nn.Module]], src: Path) -> int:
    """Bytes the store will take, from the shapes and dtypes of the converted weights (known
    before they are evaluated): expert records with their padding, resident weights, tokenizer
    files, and room for headers and JSON."""
    experts = 0
    for _, switch in switches:
        params = dict(tree_flatten(switch.parameters()))
        experts += _layout(params)[1] * next(iter(params.values())).shape[0]
    skip = tuple(f"{path}." for path, _ in switches)
    resident = sum(v.nbytes for k, v in tree_flatten(model.parameters()) if not k.startswith(skip))
    tokenizer = sum((src / n).stat().st_size for n in TOKENIZER_FILES if (src / n).is_file())
    return experts + resident + tokenizer + _HEADROOM_BYTES


def _check_destination(dst: Path) -> Path:
    """Refuse a destination that exists or cannot be created there; returns its nearest existing
    ancestor (``dst.parent`` may not exist yet), the file system the store will be written to."""
    if dst.exists():
        raise StoreError(f"{dst}: already exists; remove it or choose another destination")
    where = next(p for p in dst.absolute().parents if p.exists())
    if not where.is_dir():
        raise StoreError(f"{where}: is not a directory; cannot create {dst} under it")
    if not os.access(where, os.W_OK | os.X_OK):
        raise StoreError(f"{where}: not writable; cannot create {dst} there")
    return where


def _check_disk_space(dst: Path, where: Path, needed: int) -> None:
    """Refuse before writing anything when the destination's file system cannot hold the store."""
    free = shutil.disk_usage(where).free
    if needed > free:
        raise StoreError(
            f"{dst}: not enough free disk space to pack: the store needs about {needed:,} bytes "
            f"({needed / GiB:.2f} GiB) but {where} has {free:,} bytes free ({free / GiB:.2f} GiB); "
            f"free some space or choose another destination"
        )


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
    tensors, record_bytes = _layout(params)
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
    quantization = _switch_quantization(switch)
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


def _check_tokenizer(src: Path) -> None:
    if not any((src / name).is_file() for name in TOKENIZER_REQUIRED):
        raise StoreError(f"{src}: missing tokenizer file (one of {', '.join(TOKENIZER_REQUIRED)})")


def _copy_tokenizer(src: Path, dst: Path) -> list[str]:
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
    """Pack the checkpoint at ``src`` into a new store at ``dst`` (which must not exist).

    Everything that can be checked is checked before anything is written: the options, the
    source's config, architecture, tokenizer and weight files, and the free disk space at
    ``dst``. Raises ``StoreError`` naming the file, field or tensor at fault. Prints one line
    per tensor kind that needed another group size or stays unquantized (see ``fallback_notices``).
    """
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    _check_options(options)
    where = _check_destination(dst)
    config = _read_source_config(src)
    _check_config_fields(src / CONFIG, config)
    _check_architecture(src, config)
    _check_tokenizer(src)
    model, config = _load_source(src)
    switches = find_switch_modules(model)
    config, plan = _prepare(model, config, options, src)
    _check_disk_space(dst, where, estimate_store_bytes(model, switches, src))
    for line in fallback_notices(plan, {path for path, _ in switches}):
        print(line, file=sys.stderr)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"{dst.parent}: cannot create the destination's directory ({e})") from e
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        tokenizer_files = _copy_tokenizer(src, tmp)
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
            model_type=config["model_type"],
            layers=layers,
            tokenizer_files=tokenizer_files,
            version=required_version(layers),
        )
        (tmp / MANIFEST).write_text(manifest.to_json())  # written last: its presence means done
        _fsync_dir(tmp)
        os.rename(tmp, dst)
        _fsync_dir(dst.parent)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
