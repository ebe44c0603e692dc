"""A store of random expert records at real shapes, written through the project's store format.

The records are random bytes with real CRC32s, so the real ``ExpertReader`` reads and verifies
them; the store has no resident weights or tokenizer (it serves the expert reader, not
``FlashMoE.load``). ``synthetic_manifest`` is the same layout without files, for cache
simulations.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from flashmoe_backend.bench.shapes import QWEN35
from flashmoe_backend.store.format import CONFIG, MANIFEST, LayerSpec, Manifest, checksum, record_layout

SWITCH_MODULE = "language_model.model.layers.{}.mlp.switch_mlp"


def expert_layout(hidden: int, intermediate: int, bits: int = 4, group_size: int = 64) -> dict:
    """Tensors of one quantized SwitchGLU expert (mlx affine layout): name -> (dtype, shape, nbytes)."""
    per_word = 32 // bits
    out = {}
    for name, rows, cols in (
        ("gate_proj", intermediate, hidden),
        ("up_proj", intermediate, hidden),
        ("down_proj", hidden, intermediate),
    ):
        if cols % group_size or cols % per_word:
            raise ValueError(f"{name}: {cols} columns do not split into groups of {group_size}")
        out[f"{name}.weight"] = ("uint32", (rows, cols // per_word), rows * cols // per_word * 4)
        for part in ("scales", "biases"):
            out[f"{name}.{part}"] = ("bfloat16", (rows, cols // group_size), rows * cols // group_size * 2)
    return out


def expert_tensor_bytes(hidden: int, intermediate: int) -> int:
    """Bytes of one 4-bit expert's tensors (a record without its alignment padding)."""
    return sum(nbytes for _, _, nbytes in expert_layout(hidden, intermediate).values())


def _gaps(tensors, record_bytes: int) -> list[tuple[int, int]]:
    """(offset, nbytes) of the record's padding: between tensors and after the last one."""
    pads, end = [], 0
    for t in sorted(tensors, key=lambda t: t.offset):
        if t.offset > end:
            pads.append((end, t.offset - end))
        end = t.offset + t.nbytes
    if end < record_bytes:
        pads.append((end, record_bytes - end))
    return pads


def write_synthetic_store(
    path: Path | str,
    layers: int,
    experts: int,
    hidden: int = QWEN35["hidden"],
    intermediate: int = QWEN35["intermediate"],
    bits: int = QWEN35["bits"],
    group_size: int = QWEN35["group_size"],
    k: int = QWEN35["k"],
    seed: int = 0,
    threads: int = 2,
) -> Manifest:
    """Write an experts-only store of random records through the project's store format.

    Weights are random words; scales and biases are finite bf16 values (|x| in [2^-7, 2^-6));
    padding is zero; each record's CRC32 goes into the manifest, so the real reader verifies it.
    The pages written are dropped from the page cache, so the store starts cold.
    """
    path = Path(path)
    if (path / MANIFEST).exists():
        raise FileExistsError(f"{path}: a store already exists there")
    (path / "experts").mkdir(parents=True, exist_ok=True)
    tensors, record_bytes = record_layout(expert_layout(hidden, intermediate, bits, group_size))
    floats = [(t.offset, t.nbytes) for t in tensors if t.dtype == "bfloat16"]
    pads = _gaps(tensors, record_bytes)

    def write_layer(i: int) -> LayerSpec:
        bitgen = np.random.SFC64(np.random.SeedSequence([seed, i]))
        record = np.zeros(record_bytes, dtype=np.uint8)
        sums = []
        out = path / "experts" / f"layer_{i:03d}.bin"
        with open(out, "wb") as f:
            for _ in range(experts):
                record[:] = bitgen.random_raw(record_bytes // 8).view(np.uint8)
                for offset, nbytes in floats:
                    words = record[offset : offset + nbytes].view(np.uint16)
                    words &= 0x807F  # keep sign and low mantissa bits
                    words |= 0x3C00  # exponent 2^-7
                for offset, nbytes in pads:
                    record[offset : offset + nbytes] = 0
                sums.append(checksum(record))
                f.write(record.data)
            f.flush()
            os.fsync(f.fileno())
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return LayerSpec(
            module=SWITCH_MODULE.format(i),
            file=f"experts/{out.name}",
            num_experts=experts,
            record_bytes=record_bytes,
            tensors=tensors,
            quantization={"group_size": group_size, "bits": bits, "mode": "affine"},
            checksums=sums,
        )

    with ThreadPoolExecutor(max(1, threads)) as pool:
        specs = list(pool.map(write_layer, range(layers)))
    config = {
        "model_type": "qwen3_5_moe",
        "flashmoe_synthetic": True,
        "text_config": {
            "model_type": "qwen3_5_moe_text",
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_experts": experts,
            "num_experts_per_tok": k,
            "moe_intermediate_size": intermediate,
        },
        "quantization": {"group_size": group_size, "bits": bits},
    }
    (path / CONFIG).write_text(json.dumps(config, indent=1))
    manifest = Manifest(model_type="qwen3_5_moe", layers=specs, tokenizer_files=[])
    (path / MANIFEST).write_text(manifest.to_json())
    return manifest


def synthetic_manifest(layers: int, experts: int, record_bytes: int) -> Manifest:
    """A manifest without files, for cache simulations."""
    return Manifest(
        "synthetic",
        [
            LayerSpec(SWITCH_MODULE.format(i), f"experts/layer_{i:03d}.bin", experts, record_bytes, [], None)
            for i in range(layers)
        ],
        [],
    )
