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
hidden sibling directory and renamed into place at the end: an interrupted pack leaves nothing
at the destination, and a rerun resumes at the first unfinished layer (``store/progress.py``).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path
from mlx_lm.utils import load_model, quantize_model, save_config
from tqdm import tqdm

from flashmoe_backend.experts.switch import find_switch_modules, switch_quantization
from flashmoe_backend.store.checkpoint import (
    build_lazy_model,
    check_tokenizer,
    check_weight_files,
    read_checkpoint_config,
)
from flashmoe_backend.store.format import (
    CONFIG,
    KIND_ORDER,
    MANIFEST,
    RESIDENT,
    TOKENIZER_FILES,
    LayerSpec,
    Manifest,
    StoreError,
    TensorSpec,
    checksum,
    describe_quantization,
    record_layout,
    required_version,
    tensor_kind,
)
from flashmoe_backend.store.progress import (
    PROGRESS,
    PackProgress,
    layer_number,
    partial_dir,
    verify_layer_file,
)

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8, 16)
GROUP_SIZES = (32, 64, 128)  # the group sizes MLX's affine quantization supports
CONVERSION_DTYPES = ("float16", "bfloat16", "float32")
GiB = 1024**3
# Room for what the size estimate leaves out: safetensors headers, config and manifest JSON.
_HEADROOM_BYTES = 1 << 20


@dataclass(frozen=True)
class PackOptions:
    """What to pack into. ``bits=16`` keeps float experts (no quantization)."""

    bits: int = 4
    group_size: int = 64
    dtype: str | None = None  # float dtype of unquantized weights; default: the checkpoint's
    progress: bool = True
    #: delete each source shard once every tensor of it is in the store, verified (for a disk
    #: that cannot hold both); the pack then cannot be run again from the same source
    delete_source_shards: bool = False


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


def _load_source(src: Path, gone: Collection[str] = ()) -> tuple[nn.Module, dict]:
    """The model of ``src``, lazily (nothing is read until evaluated). ``gone``: shards a
    resumed pack already deleted (``--delete-source-shards``); their tensors are all in finished
    steps, so they are neither required nor read."""
    check_weight_files(src, gone)
    try:
        return load_model(src, lazy=True, strict=not gone)
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
    quantization = switch_quantization(switch)
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


def _write_resident(model: nn.Module, skip: tuple[str, ...], out: Path) -> None:
    """Write the resident (non-expert) weights, read them back from the disk and compare; then
    free them (they are not needed again, and the expert layers follow)."""
    resident = {k: v for k, v in tree_flatten(model.parameters()) if not k.startswith(skip)}
    mx.save_safetensors(str(out), resident, metadata={"format": "mlx"})
    with open(out, "rb") as f:
        os.fsync(f.fileno())
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # compare what the disk holds
    written = mx.load(str(out))
    if set(written) != set(resident):
        raise StoreError(f"{out}: holds other tensors than were written; the disk lost data")
    for name, value in resident.items():
        same = mx.array_equal(value, written[name], equal_nan=True).item()
        if value.dtype != written[name].dtype or not same:
            raise StoreError(f"{out}: tensor {name} reads back differently; the disk lost data")
    model.update(tree_map_with_path(lambda k, v: mx.array([]) if not k.startswith(skip) else v,
                                    model.parameters()))


def _lock(directory: Path) -> int:
    """Hold an exclusive lock on ``directory`` (released when the process ends): two packs to
    one destination would write the same files."""
    import fcntl

    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StoreError(f"{directory}: another flashmoe pack is writing this store") from None
    return fd


def _delete_consumed(src: Path, progress: PackProgress, layer_numbers: list[int]) -> None:
    """``--delete-source-shards``: delete each source shard whose every tensor is in a finished,
    verified step. Recorded first, then deleted: a crash in between leaves a shard that the
    journal already counts as gone, never the reverse. A Hugging Face cache file is a link to a
    blob: both go."""
    for shard in progress.consumed_shards(src, layer_numbers):
        progress.deleted_shards.append(shard.name)
        progress.save()
        target = shard.resolve()
        shard.unlink()
        if target != shard.absolute() and target.exists():
            target.unlink()
        print(f"flashmoe pack: deleted {shard} (every tensor of it is in the store)", file=sys.stderr)


def pack(src: Path | str, dst: Path | str, options: PackOptions = PackOptions()) -> Manifest:
    """Pack the checkpoint at ``src`` into a new store at ``dst`` (which must not exist).

    Everything that can be checked is checked before anything is written: the options, the
    source's config, architecture, tokenizer and weight files, and the free disk space at
    ``dst`` (for what is left to write). Raises ``StoreError`` naming the file, field or tensor
    at fault. Prints one line per tensor kind that needed another group size or stays
    unquantized (see ``fallback_notices``).

    Resumable: the store is built in ``.<name>.partial`` beside ``dst`` and each finished step
    (resident weights, then each expert layer) is verified and recorded there
    (``store/progress.py``); an interrupted pack, run again with the same source and options,
    verifies the finished layers and resumes at the first unfinished one. The store is renamed
    into place, loadable, only when complete. ``options.delete_source_shards`` deletes each
    source shard once all of it is in the store.
    """
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    _check_options(options)
    where = _check_destination(dst)
    config = read_checkpoint_config(src)
    build_lazy_model(src, config)  # refuses what is not an mlx-lm MoE, before reading any weight
    check_tokenizer(src)
    tmp = partial_dir(dst)
    # A partial pack is locked before it is read: another pack may be writing it.
    locks = [_lock(tmp)] if tmp.is_dir() else []
    try:
        return _pack_into(src, dst, tmp, where, config, options, locks)
    finally:
        for fd in locks:
            os.close(fd)


def _pack_into(
    src: Path, dst: Path, tmp: Path, where: Path, config: dict, options: PackOptions, locks: list[int]
) -> Manifest:
    """``pack`` from the journal on: resume or start in ``tmp`` (locked in ``locks`` if it existed;
    else created and locked here, the lock added to ``locks`` for ``pack`` to release)."""
    progress, notice = PackProgress.start(
        tmp, src, {"bits": options.bits, "group_size": options.group_size, "dtype": options.dtype}
    )
    model, config = _load_source(src, gone=progress.deleted_shards)
    switches = find_switch_modules(model)
    config, plan = _prepare(model, config, options, src)
    done = progress.done_bytes() + ((tmp / RESIDENT).stat().st_size if progress.resident else 0)
    _check_disk_space(dst, where, estimate_store_bytes(model, switches, src) - done)
    for line in fallback_notices(plan, {path for path, _ in switches}):
        print(line, file=sys.stderr)
    if notice:
        print(notice, file=sys.stderr)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"{dst.parent}: cannot create the destination's directory ({e})") from e
    if not locks:
        tmp.mkdir(exist_ok=True)
        locks.append(_lock(tmp))
    elif not progress.layers and not progress.resident:
        for child in tmp.iterdir():  # nothing of it is kept: start clean
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
    (tmp / "experts").mkdir(exist_ok=True)
    skip = tuple(f"{path}." for path, _ in switches)
    numbers = [layer_number(path + ".") for path, _ in switches]
    try:
        progress.save()
        tokenizer_files = _copy_tokenizer(src, tmp)
        if not progress.resident:
            _write_resident(model, skip, tmp / RESIDENT)
            progress.resident = True
            progress.save()
        if options.delete_source_shards:
            _delete_consumed(src, progress, numbers)
        start = len(progress.layers)  # resume at the first unfinished layer
        bar = tqdm(total=len(switches), initial=start, desc="pack experts", unit="layer",
                   disable=not options.progress)
        for i in range(start, len(switches)):
            path, switch = switches[i]
            out = tmp / "experts" / f"layer_{i:03d}.bin"
            spec = _write_layer(path, switch, out)
            problem = verify_layer_file(out, spec)
            if problem is not None:
                raise StoreError(f"{problem} right after it was written; the disk lost data")
            progress.layers.append(spec)
            progress.save()
            if options.delete_source_shards:
                _delete_consumed(src, progress, numbers)
            bar.update()
        bar.close()
        layers = progress.layers
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
        (dst / PROGRESS).unlink()
        _fsync_dir(dst.parent)
        return manifest
    except BaseException:
        print(
            f"flashmoe pack: stopped with {len(progress.layers)} of {len(switches)} expert layers done "
            f"and verified in {tmp}; run the same command again to resume there (or delete it)",
            file=sys.stderr,
        )
        raise
