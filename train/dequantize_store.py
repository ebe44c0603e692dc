"""Turn a quantized flashmoe store back into a float checkpoint, and re-pack it at other bit widths.

    python train/dequantize_store.py STORE OUT_DIR                 # float checkpoint in OUT_DIR
    python train/dequantize_store.py STORE OUT_DIR --bits 2        # a 2-bit store in OUT_DIR
    python train/dequantize_store.py STORE OUT_DIR --bits 8,2      # OUT_DIR/store-8bit, store-2bit

The trained Hugging Face checkpoint of the demo model is not in the repository, only its 4-bit
store. :func:`dequantize_store` rebuilds a float checkpoint from that store: every quantized
resident matrix (``weight``/``scales``/``biases``, each with its own group size and bits from the
config's ``quantization`` entry: the routers are 8-bit) and every expert record (``experts/*.bin``,
one record per expert, laid out by the manifest) goes through ``mx.dequantize``; the experts are
stacked as mlx-lm's ``switch_mlp`` tensors ``[experts, out, in]``. The result is an mlx-lm layout
checkpoint (already sanitized parameter names, no ``quantization`` in its config), which
``flashmoe_backend.pack`` accepts like any float checkpoint and quantizes with mlx-lm's own
``quantize_model`` (:func:`requantize_store`).

What this is and is not: a store packed from the dequantized checkpoint quantizes the 4-bit
model's weights, not the original float ones. At 8 bits that is the 4-bit model almost exactly
(8-bit steps are finer than the 4-bit grid); at 4 bits with the same group size it reproduces
the shipped store's values; at 2 bits it is "the 4-bit model, quantized again to 2 bits", which
loses a little more than quantizing the float weights to 2 bits would have.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from flashmoe_backend.store.format import CONFIG, RESIDENT, read_config, read_manifest

_QUANT_KEYS = ("quantization", "quantization_config")


def _quant_params(config: dict, module: str) -> tuple[int, int, str]:
    """(group_size, bits, mode) of a resident module, from the config's quantization entry."""
    q = config["quantization"]
    own = q.get(module)
    if isinstance(own, dict):
        return own.get("group_size", q["group_size"]), own.get("bits", q["bits"]), own.get(
            "mode", q.get("mode", "affine"))
    return q["group_size"], q["bits"], q.get("mode", "affine")


def _dequantize(w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int,
                mode: str, dtype: mx.Dtype) -> mx.array:
    out = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode)
    return out.astype(dtype)


def dequantize_resident(store: Path, config: dict, dtype: mx.Dtype) -> dict[str, mx.array]:
    """The store's resident weights with every quantized matrix back in float."""
    weights = mx.load(str(store / RESIDENT))
    out: dict[str, mx.array] = {}
    for name, value in weights.items():
        if name.endswith((".scales", ".biases")):
            continue
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and f"{module}.scales" in weights:
            group_size, bits, mode = _quant_params(config, module)
            out[name] = _dequantize(value, weights[f"{module}.scales"], weights.get(f"{module}.biases"),
                                    group_size, bits, mode, dtype)
        else:
            out[name] = value
    return out


def dequantize_experts(store: Path, dtype: mx.Dtype) -> dict[str, mx.array]:
    """Every layer's expert records as stacked float ``switch_mlp`` tensors ``[E, out, in]``."""
    manifest = read_manifest(store)
    out: dict[str, mx.array] = {}
    for layer in manifest.layers:
        raw = np.fromfile(store / layer.file, dtype=np.uint8).reshape(layer.num_experts, layer.record_bytes)
        tensors = {}
        for t in layer.tensors:
            carrier = np.uint16 if t.dtype == "bfloat16" else np.dtype(t.dtype)
            block = np.ascontiguousarray(raw[:, t.offset : t.offset + t.nbytes])
            arr = mx.array(block.view(carrier).reshape(layer.num_experts, *t.shape))
            tensors[t.name] = arr.view(mx.bfloat16) if t.dtype == "bfloat16" else arr
        for proj in sorted({name.split(".")[0] for name in tensors}):
            w = tensors[f"{proj}.weight"]
            q = layer.module_quantization(proj)  # projections may differ (per-tensor fallback)
            if q is not None and f"{proj}.scales" in tensors:
                w = _dequantize(w, tensors[f"{proj}.scales"], tensors.get(f"{proj}.biases"),
                                q["group_size"], q["bits"], q["mode"], dtype)
            out[f"{layer.module}.{proj}.weight"] = w.astype(dtype)
    return out


def dequantize_store(store: str | Path, dst: str | Path, dtype: str = "float32") -> Path:
    """Write the float checkpoint of a quantized store into ``dst`` (created; must not exist).

    ``dst`` holds ``config.json`` (the store's, without its quantization entries),
    ``model.safetensors`` (resident and expert weights, mlx-lm names) and the tokenizer files."""
    store, dst = Path(store), Path(dst)
    config = read_config(store)
    manifest = read_manifest(store)
    target = getattr(mx, dtype)
    if dst.exists():
        raise FileExistsError(f"{dst}: already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        weights = dequantize_resident(store, config, target) if "quantization" in config else dict(
            mx.load(str(store / RESIDENT)))
        weights.update(dequantize_experts(store, target))
        mx.save_safetensors(str(tmp / RESIDENT), weights, metadata={"format": "mlx"})
        float_config = {k: v for k, v in config.items() if k not in _QUANT_KEYS}
        (tmp / CONFIG).write_text(json.dumps(float_config, indent=4))
        for name in manifest.tokenizer_files:
            shutil.copy2(store / name, tmp / name)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def requantize_store(store: str | Path, dst: str | Path, bits: int, group_size: int = 32,
                     dtype: str = "float32", checkpoint: str | Path | None = None) -> Path:
    """A store at ``bits`` made from a quantized store: dequantize (into ``checkpoint``, or a
    temporary directory), then ``flashmoe_backend.pack`` at ``bits`` / ``group_size`` with float
    resident weights of ``dtype`` (the demo store's packing: ``bits=4, group_size=32,
    dtype="float32"``)."""
    from flashmoe_backend import PackOptions, pack

    dst = Path(dst)
    with tempfile.TemporaryDirectory(prefix="flashmoe-dequant-") as work:
        hf = Path(checkpoint) if checkpoint is not None else Path(work) / "float"
        if not (hf / CONFIG).is_file():
            dequantize_store(store, hf, dtype)
        pack(hf, dst, PackOptions(bits=bits, group_size=group_size, dtype=dtype, progress=False))
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--bits", default=None, help="re-pack at these bit widths (comma-separated)")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)
    if args.bits is None:
        print(dequantize_store(args.store, args.out, args.dtype))
        return 0
    widths = [int(b) for b in args.bits.split(",")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="flashmoe-dequant-") as work:
        hf = dequantize_store(args.store, Path(work) / "float", args.dtype)
        for bits in widths:
            dst = args.out if len(widths) == 1 else args.out / f"store-{bits}bit"
            print(requantize_store(args.store, dst, bits, args.group_size, args.dtype, checkpoint=hf))
    return 0


if __name__ == "__main__":
    sys.exit(main())
