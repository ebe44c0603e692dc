#!/usr/bin/env python3
"""Reading experts in place from an mlx-community checkpoint vs from a packed store: decode
ms/token at the same cache budget and routing trace (issue #18).

Writes, once, N layers (default 4) of Qwen3.5-397B-A17B experts at their real shapes (512 experts
of 7,077,888 bytes a layer: 4-bit gate/up/down, bf16 scales and biases, group 64) in both layouts,
holding the same bytes:

* packed: a flashmoe store (``write_synthetic_store``: one aligned record per expert, one file a
  layer, random contents with real CRC32s);
* in place: an mlx-community-style checkpoint made from those records: each layer's experts
  stacked as ``...switch_mlp.{gate,up,down}_proj.{weight,scales,biases}`` ``[512, ...]``, the
  resident weights of the same layers (mlx-lm's ``qwen3_5_moe`` at its real shapes, random,
  quantized like the mlx-community files: 4-bit, router and shared-expert gate 8-bit), tensors in
  mlx-lm's parameter order, in shards of at most 5 GB as ``mlx_lm``'s save makes them. A smaller
  vocabulary (``--vocab``, default 4,096) keeps the embedding small: the expert replay never
  reads it. The checkpoint is opened by the real ``Checkpoint`` (store/checkpoint.py), as
  ``FlashMoE.load`` opens one.

Then, per run and layout (alternating which goes first), a cold decode of the same calibrated
routing trace through the REAL reader and cache (``flashmoe_backend.bench.replay.run_decode``: per
token and layer ``ExpertStreamer.fetch``, every miss of the layer read at once on the reader's
threads, O_DIRECT, CRC32 on first read; the expert compute stood in for by one read of the
experts' bytes). Reported: ms/token (median, min, max over ``--runs``), in place vs packed speed,
hit rate, bytes read from disk per token, and both layouts' raw cold read bandwidth.

    python -m bench.inplace [--layers 4] [--work DIR] [--runs 3] [--json PATH]

``--tiny``: a few small layers, seconds on a CPU (tests/bench/test_bench.py runs it). The files
stay in ``--work`` (default a temporary directory, deleted at the end) for a later run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from bench.h200_model import build_model
from flashmoe_backend.bench import shapes
from flashmoe_backend.bench import trace as tr
from flashmoe_backend.bench.bandwidth import measure_disk, measure_memory, random_records
from flashmoe_backend.bench.replay import RunConfig, run_decode
from flashmoe_backend.bench.synthetic_store import write_synthetic_store
from flashmoe_backend.experts.reader import ExpertReader, ReaderConfig
from flashmoe_backend.store.checkpoint import Checkpoint
from flashmoe_backend.store.format import MANIFEST, read_manifest
from flashmoe_backend.store.source import default_store

SHARD_BYTES = 5 << 30  # mlx-lm's MAX_FILE_SIZE_GB
_ST_DTYPES = {"uint32": "U32", "bfloat16": "BF16", "float32": "F32", "float16": "F16", "uint8": "U8"}


def log(msg: str) -> None:
    print(f"[inplace {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def spread(values: list[float]) -> dict:
    return {"runs": len(values), "median": statistics.median(values), "min": min(values),
            "max": max(values), "each": list(values)}


def _config(s: dict) -> dict:
    """mlx-lm's Qwen3.5-MoE config at shape ``s`` with the mlx-community quantization entries."""
    from bench.h200_model import model_config

    config = model_config(s)
    q = {"group_size": s["group_size"], "bits": s["bits"], "mode": "affine"}
    for i in range(s["layers"]):
        for gate in ("mlp.gate", "mlp.shared_expert_gate"):
            q[f"language_model.model.layers.{i}.{gate}"] = {"group_size": 64, "bits": 8}
    config["quantization"] = config["quantization_config"] = q
    return config


def _resident_model(s: dict, seed: int):
    """The lazy model at shape ``s`` with its resident weights quantized like the mlx-community
    checkpoints (the experts stay lazy: never evaluated, never in memory)."""
    model = build_model(s, seed)

    def predicate(path, m):
        if "switch_mlp" in path or not hasattr(m, "to_quantized"):
            return False
        if path.endswith((".gate", "shared_expert_gate")):
            return {"group_size": 64, "bits": 8}
        return m.weight.shape[-1] % 64 == 0

    nn.quantize(model, group_size=64, bits=4, class_predicate=predicate)
    return model


def write_checkpoint(path: Path, store: Path, s: dict, seed: int = 0) -> None:
    """The mlx-community-style checkpoint of the packed store's experts (see the module doc)."""
    manifest = read_manifest(store)
    by_module = {layer.module: (i, layer) for i, layer in enumerate(manifest.layers)}
    model = _resident_model(s, seed)
    entries = []  # (name, dtype, shape, nbytes, source) in mlx-lm's parameter order
    for name, value in tree_flatten(model.parameters()):
        if ".switch_mlp." in name:
            # The lazy model's experts are unquantized: take each projection's tensors (weight,
            # scales, biases, as mlx-lm orders a quantized one) from the store's records.
            module, _, tensor = name.rpartition(".switch_mlp.")
            i, layer = by_module[module + ".switch_mlp"]
            projection = tensor.removesuffix(".weight")
            for part in ("weight", "scales", "biases"):
                spec = next((t for t in layer.tensors if t.name == f"{projection}.{part}"), None)
                if spec is not None:
                    entries.append((f"{module}.switch_mlp.{spec.name}", spec.dtype,
                                    [layer.num_experts, *spec.shape], layer.num_experts * spec.nbytes,
                                    ("expert", i, spec)))
        else:
            if mx.issubdtype(value.dtype, mx.floating) and not name.endswith("A_log"):
                value = value.astype(mx.bfloat16)
            dtype = str(value.dtype).removeprefix("mlx.core.")
            entries.append((name, dtype, list(value.shape), value.nbytes, ("resident", value)))
    shards, size = [[]], 0
    for entry in entries:
        if shards[-1] and size + entry[3] > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry[3]
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(_config(s), indent=1))
    shutil.copy(default_store() / "tokenizer.json", path / "tokenizer.json")  # present; never read
    records: dict[int, np.ndarray] = {}
    weight_map = {}
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "mlx"}}, 0
        for name, dtype, shape, nbytes, _ in shard:
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": shape,
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(path / file, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for *_, source in shard:
                if source[0] == "resident":
                    value = source[1]
                    mx.eval(value)
                    carrier = value.view(mx.uint16) if value.dtype == mx.bfloat16 else value
                    f.write(memoryview(np.array(carrier)).cast("B"))
                    continue
                _, i, spec = source
                if i not in records:  # one layer's records at a time in memory
                    records.clear()
                    layer = manifest.layers[i]
                    records[i] = np.fromfile(store / layer.file, dtype=np.uint8).reshape(
                        layer.num_experts, layer.record_bytes)
                for e in range(records[i].shape[0]):
                    f.write(records[i][e, spec.offset : spec.offset + spec.nbytes].data)
            f.flush()
            os.fsync(f.fileno())
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        log(f"wrote {file} ({len(shard)} tensors, {offset / 2**30:.2f} GiB)")
    for layer in manifest.layers:  # reading the records filled the page cache: start cold
        fd = os.open(store / layer.file, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    index = {"metadata": {"total_size": sum(e[3] for e in entries)}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def same_bytes(store: Path, checkpoint: Checkpoint, samples: int = 6, seed: int = 0) -> bool:
    """The two layouts give the reader identical experts (a few drawn at random)."""
    manifest = read_manifest(store)
    rng = np.random.default_rng(seed)
    keys = random_records(rng, len(manifest.layers), manifest.layers[0].num_experts, samples)
    packed = ExpertReader(store, manifest, ReaderConfig(verify="always"))
    inplace = ExpertReader(checkpoint, config=ReaderConfig(verify="never"))
    try:
        for layer, e in keys:
            (a,), (b,) = packed.read(layer, [e]), inplace.read(layer, [e])
            if sorted(a) != sorted(b) or not all(mx.array_equal(a[n], b[n]).item() for n in a):
                return False
    finally:
        packed.close()
        inplace.close()
    return True


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=None, help="default: the model's 512")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=48, help="decode tokens timed")
    p.add_argument("--warmup", type=int, default=16, help="decode tokens before timing")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--budget-frac", type=float, default=0.25, help="cache budget: share of the expert bytes")
    p.add_argument("--io-threads", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=None, help="where both layouts are written (kept)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--tiny", action="store_true", help="small layers: seconds on a CPU")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    s = dict(shapes.TINY if args.tiny else shapes.QWEN35, layers=args.layers, vocab=args.vocab)
    if args.experts:
        s["experts"] = args.experts
    work = args.work or Path(tempfile.mkdtemp(prefix="flashmoe-inplace-"))
    store, ckpt = work / "packed", work / "checkpoint"
    tic = time.perf_counter()
    if not (store / MANIFEST).is_file():
        log(f"writing the packed store: {args.layers} layers x {s['experts']} experts")
        write_synthetic_store(store, args.layers, s["experts"], s["hidden"], s["intermediate"],
                              s["bits"], s["group_size"], s["k"], seed=args.seed, threads=4)
    if not (ckpt / "model.safetensors.index.json").is_file():
        log("writing the mlx-community-style checkpoint from the same records")
        write_checkpoint(ckpt, store, s, args.seed)
    written = time.perf_counter() - tic
    os.environ.setdefault("FLASHMOE_HOME", str(work / "flashmoe-home"))
    tic = time.perf_counter()
    checkpoint = Checkpoint.open(ckpt)
    index_seconds = time.perf_counter() - tic
    manifest = read_manifest(store)
    assert [layer.record_bytes for layer in checkpoint.manifest.layers] == [
        layer.record_bytes for layer in manifest.layers]
    identical = same_bytes(store, checkpoint)
    rb = manifest.layers[0].record_bytes
    budget = int(args.budget_frac * manifest.expert_bytes) // rb * rb
    spec = tr.TraceSpec(tokens=args.warmup + args.tokens, layers=args.layers, experts=s["experts"],
                        k=s["k"], seed=args.seed)
    trace = tr.generate_trace(spec)
    rng = np.random.default_rng([args.seed, 3])
    keys = random_records(rng, args.layers, s["experts"], min(256, args.layers * s["experts"]))
    sources = {"packed": store, "in_place": checkpoint}
    raw = {name: measure_disk(src, manifest, keys, s["k"], args.io_threads) for name, src in sources.items()}
    memory = measure_memory(store, manifest, records=min(64, len(keys)))
    disk_bw = raw["packed"]["bytes_per_s"]
    runs: dict[str, list[dict]] = {"packed": [], "in_place": []}
    for r in range(args.runs):
        for name in (("packed", "in_place") if r % 2 == 0 else ("in_place", "packed")):
            cfg = RunConfig(name=name, budget_bytes=budget, io_threads=args.io_threads, seed=args.seed)
            src = sources[name]
            result = run_decode(src, manifest, trace, cfg, args.warmup, disk_bw, memory["bytes_per_s"])
            runs[name].append(result)
            log(f"run {r + 1} {name}: {result['seconds_per_token'] * 1e3:.1f} ms/token, "
                f"hit rate {result['hit_rate']:.3f}")
    ms = {name: spread([x["seconds_per_token"] * 1e3 for x in rows]) for name, rows in runs.items()}
    report = {
        "command": "python -m bench.inplace " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "mlx": mx.__version__, "device": str(mx.default_device())},
        "shape": s,
        "layers": args.layers,
        "record_bytes": rb,
        "expert_bytes": manifest.expert_bytes,
        "budget_bytes": budget,
        "budget_fraction": budget / manifest.expert_bytes,
        "trace": spec.to_dict(),
        "write_seconds": written,
        "checkpoint_shards": len(checkpoint.files),
        "checkpoint_index_seconds": index_seconds,
        "same_expert_bytes": identical,
        "raw_cold_read": raw,
        "memory_bandwidth": memory,
        "ms_per_token": ms,
        "in_place_speed_vs_packed": ms["packed"]["median"] / ms["in_place"]["median"],
        "hit_rate": {name: [x["hit_rate"] for x in rows] for name, rows in runs.items()},
        "disk_bytes_per_token": {
            name: [x["disk_bytes_per_token"] for x in rows] for name, rows in runs.items()
        },
        "runs": runs,
    }
    for line in summary(report):
        print(line)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return report


def summary(report: dict) -> list[str]:
    ms = report["ms_per_token"]

    def row(name):
        m = ms[name]
        disk = [d for d in report["disk_bytes_per_token"][name] if d is not None]
        return (f"| {name.replace('_', ' ')} | {m['median']:.1f} | {m['min']:.1f}-{m['max']:.1f} | "
                f"{statistics.median(report['hit_rate'][name]):.3f} | "
                f"{statistics.median(disk) / 2**20:.1f} | "
                f"{report['raw_cold_read'][name]['bytes_per_s'] / 1e9:.2f} |" if disk else "")

    return [
        f"{report['layers']} layers, {report['budget_fraction']:.0%} budget, {report['checkpoint_shards']} "
        f"checkpoint shards, index {report['checkpoint_index_seconds'] * 1e3:.0f} ms, same bytes: "
        f"{report['same_expert_bytes']}",
        "| layout | ms/token (median) | min-max | hit rate | disk MiB/token | raw cold read GB/s |",
        "|---|---|---|---|---|---|",
        row("packed"),
        row("in_place"),
        f"in place speed vs packed: {report['in_place_speed_vs_packed']:.3f}x",
    ]


if __name__ == "__main__":
    main()
