"""Train the embedded demo model: a small Qwen3.5-MoE on the synthetic chat corpus of train/data.py.

    python train/train.py --out OUT [--minutes 8]          # the demo model (GPU if there is one)
    python train/train.py --out OUT --tiny --minutes 0.5   # a toy run on CPU, for tests

The model is transformers' ``Qwen3_5MoeForCausalLM`` with the real layer pattern: GatedDeltaNet
(linear attention) layers with a gated full-attention layer every 4th, and sparse MoE MLPs (many
small routed experts, top-k, plus a gated shared expert). It trains with AdamW, bf16 autocast on
CUDA, a warmup + cosine learning-rate schedule over the WALL-CLOCK budget, length-bucketed padded
batches (no packing: GatedDeltaNet's recurrent state would leak across packed documents without the
flash-linear-attention varlen kernels), loss on the assistant tokens only, and a small
load-balancing loss on the routers.

``--minutes`` is the budget of the whole run, from start to saved checkpoint. ``OUT`` gets the
Hugging Face checkpoint in the real Qwen3.5 on-disk layout (the one ``tests/fixtures/tiny.py``
writes: ``model_type: qwen3_5_moe`` with ``text_config``, tensors under ``model.language_model.*``,
experts fused as ``mlp.experts.gate_up_proj`` / ``down_proj``) as ONE ``model.safetensors``, the
tokenizer (``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``),
``generation_config.json`` and ``train_log.json``: 7 files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

if __name__ == "__main__":  # run as a script: import `train` (the package), not this file
    sys.path[0] = str(Path(__file__).resolve().parents[1])

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per data worker

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tests.fixtures import tiny
from train import data
from train.tokenizer import build_tokenizer, use_qwen_pipeline

HELD_OUT_SEED = 1_000_003  # evaluation data: a different seed than any training seed


@dataclass
class ModelShape:
    num_layers: int = 8
    hidden_size: int = 192
    num_experts: int = 32
    top_k: int = 4
    moe_intermediate_size: int = 32
    shared_expert_intermediate_size: int = 128
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    linear_num_key_heads: int = 4
    linear_num_value_heads: int = 8
    linear_key_head_dim: int = 32
    linear_value_head_dim: int = 32


DEMO_SHAPE = ModelShape()
TINY_SHAPE = ModelShape(num_layers=4, hidden_size=64, num_experts=8, top_k=2, moe_intermediate_size=32,
                        shared_expert_intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                        head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                        linear_key_head_dim=16, linear_value_head_dim=16)


def make_model(shape: ModelShape, vocab_size: int, eos_id: int, pad_id: int, aux_coef: float = 0.01):
    import transformers

    cfg = transformers.Qwen3_5MoeTextConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        num_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k,
        moe_intermediate_size=shape.moe_intermediate_size,
        shared_expert_intermediate_size=shape.shared_expert_intermediate_size,
        linear_num_key_heads=shape.linear_num_key_heads,
        linear_num_value_heads=shape.linear_num_value_heads,
        linear_key_head_dim=shape.linear_key_head_dim,
        linear_value_head_dim=shape.linear_value_head_dim,
        linear_conv_kernel_dim=4,
        full_attention_interval=4,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        initializer_range=0.02,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        router_aux_loss_coef=aux_coef,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    )
    return transformers.Qwen3_5MoeForCausalLM(cfg)


def param_counts(model, shape: ModelShape) -> dict:
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    embed = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    active = total - experts * (1 - shape.top_k / shape.num_experts)
    return {"total": total, "routed_experts": experts, "embeddings": embed, "active_per_token": int(active),
            "active_non_embedding": int(active - embed)}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class Batches(IterableDataset):
    """Ready training batches of corpus ``seed``, built in the data workers.

    Worker ``w`` of ``n`` tokenizes examples ``w, w + n, w + 2n, ...``, keeps a pool of
    ``pool`` sequences, sorts it by length and cuts it into padded batches of at most
    ``batch_tokens`` tokens (padding included), which it yields in random order as numpy arrays
    (cheap to pass between processes): see :func:`collate`."""

    def __init__(self, tok_dir: str, seed: int, max_len: int, batch_tokens: int, pool: int, pad_id: int,
                 mix: dict[str, float] | None = None):
        self.tok_dir, self.seed, self.max_len, self.mix = tok_dir, seed, max_len, mix
        self.batch_tokens, self.pool, self.pad_id = batch_tokens, pool, pad_id

    def __iter__(self):
        from transformers import AutoTokenizer

        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        tok = AutoTokenizer.from_pretrained(self.tok_dir)
        rng = random.Random(f"{self.seed}:{wid}")
        i, buf = wid, []
        while True:
            buf += data.encode(tok, data.example(self.seed, i, mix=self.mix), self.max_len)
            i += nw
            if len(buf) < self.pool:
                continue
            buf.sort(key=lambda s: len(s[0]))
            groups, group = [], []
            for seq in buf:
                if group and (len(group) + 1) * len(seq[0]) > self.batch_tokens:
                    groups.append(group)
                    group = []
                group.append(seq)
            buf = group  # the longest leftovers wait for the next pool
            rng.shuffle(groups)
            for g in groups:
                yield collate(g, self.pad_id)


def collate(group: list, pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded ``ids`` [B, T] and ``mask`` [B, T] (1 on trained tokens), plus the flat
    indices ``pos`` (into the [B * T] positions) of the positions that predict a trained token and
    those tokens, ``tgt``: the loss needs no data-dependent shapes on the device."""
    width = max(len(ids) for ids, _ in group)
    ids = np.full((len(group), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(group), width), dtype=bool)
    for row, (x, m) in enumerate(group):
        ids[row, : len(x)] = x
        mask[row, : len(m)] = m
    b, t = np.nonzero(mask[:, 1:])
    return {"ids": ids, "mask": mask, "pos": b * width + t, "tgt": ids[b, t + 1]}


def to_device(batch: dict, device) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v).to(device, non_blocking=True) for k, v in batch.items()}


class Feeder:
    """Pulls batches from the data loader in a thread. ``get()`` returns a fresh batch when one is
    ready, else (``replay``) one of the last ``keep`` batches again, so that the GPU never waits on
    the data workers; ``get()`` blocks only until the first batch."""

    def __init__(self, loader, replay: bool, keep: int = 64, seed: int = 0):
        import queue
        import threading

        self.q: queue.Queue = queue.Queue(maxsize=32)
        self.replay, self.keep = replay, keep
        self.recent: deque = deque(maxlen=keep)
        self.rng = random.Random(seed)
        self.fresh = self.replayed = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(loader,), daemon=True)
        self.thread.start()

    def _run(self, loader) -> None:
        try:
            for batch in loader:
                self.q.put(batch)
        except BaseException as e:  # noqa: BLE001 - re-raised in get()
            self.error = e

    def get(self) -> dict:
        import queue

        if self.error is not None:
            raise RuntimeError("data loading failed") from self.error
        try:
            batch = self.q.get_nowait() if (self.replay and self.recent) else self.q.get(timeout=600)
        except queue.Empty:
            self.replayed += 1
            return self.rng.choice(self.recent)
        self.fresh += 1
        self.recent.append(batch)
        return batch


def held_out(tok, n: int, max_len: int) -> dict[str, list]:
    """Fixed evaluation sequences per kind (HELD_OUT_SEED)."""
    out: dict[str, list] = {}
    for kind in data.KINDS:
        seqs = []
        for ex in data.examples(HELD_OUT_SEED, n, kind=kind):
            seqs += data.encode(tok, ex, max_len)
        out[kind] = seqs[:n]
    return out


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def loss_fn(model, batch: dict, pad_id: int, aux: bool = True):
    """Cross-entropy on the trained (assistant) tokens + the router load-balancing loss.

    Only the positions that predict a trained token (``batch["pos"]``) go through the LM head."""
    import torch.nn.functional as F

    ids = batch["ids"]
    out = model.model(input_ids=ids, output_router_logits=aux)
    hidden = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
    logits = model.lm_head(hidden.index_select(0, batch["pos"])).float()
    ce = F.cross_entropy(logits, batch["tgt"])
    if not aux or not getattr(out, "router_logits", None):
        return ce, ce.detach()
    attn = (ids != pad_id) | batch["mask"]
    lb = _load_balancing(model, out.router_logits, attn)
    return ce + model.config.router_aux_loss_coef * lb, ce.detach()


def _load_balancing(model, router_logits, attn: torch.Tensor) -> torch.Tensor:
    module = sys.modules[type(model).__module__]
    fn = module.load_balancing_loss_func
    return fn(router_logits, model.config.num_experts, model.config.num_experts_per_tok, attn)


@torch.no_grad()
def evaluate_loss(model, sets: dict[str, list], pad_id: int, device, autocast, batch: int = 16) -> dict:
    model.eval()
    out = {}
    for kind, seqs in sets.items():
        total, count = 0.0, 0
        for i in range(0, len(seqs), batch):
            b = collate(seqs[i: i + batch], pad_id)
            n = len(b["pos"])
            with autocast():
                _, ce = loss_fn(model, to_device(b, device), pad_id, aux=False)
            total += float(ce) * n
            count += n
        out[kind] = total / max(count, 1)
    model.train()
    return out


# --------------------------------------------------------------------------------------------
# Saving in the real Qwen3.5 layout
# --------------------------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json")


def save_checkpoint(model, tok_dir: Path, out_dir: Path, dtype: str = "float16") -> Path:
    """Write the Hugging Face checkpoint the way ``tiny.build_tiny_checkpoint`` does for
    ``qwen3_5_moe``: one safetensors file with ``model.language_model.*`` keys and fused experts,
    the config wrapped as ``Qwen3_5MoeForConditionalGeneration`` with ``text_config``, the
    tokenizer and a ``generation_config.json`` whose EOS is ``<|im_end|>``."""
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (Path(tok_dir) / name).is_file():
            shutil.copy(Path(tok_dir) / name, out_dir / name)
    tensors = {}
    for key, value in model.state_dict().items():
        if key.startswith("model."):
            key = "model.language_model." + key[len("model."):]
        tensors[key] = value.detach().to("cpu", torch_dtype)
    tiny.write_safetensors(out_dir / "model.safetensors", tensors)
    text_config = model.config.to_diff_dict()
    text_config.pop("architectures", None)
    for key in ("output_router_logits", "_experts_implementation", "experts_implementation"):
        text_config.pop(key, None)
    text_config["model_type"] = model.config.model_type
    text_config["dtype"] = dtype
    text_config.pop("torch_dtype", None)
    config = {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "text_config": text_config,
        "tie_word_embeddings": False,
        "transformers_version": text_config.get("transformers_version"),
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation_config = {
        "bos_token_id": model.config.pad_token_id,
        "eos_token_id": model.config.eos_token_id,
        "pad_token_id": model.config.pad_token_id,
        "do_sample": False,
        # read by flashmoe at load: the demo model was never trained to think
        "chat_template_kwargs": {"enable_thinking": False},
    }
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    return out_dir


def shape_of(ckpt: Path) -> ModelShape:
    """The :class:`ModelShape` of a checkpoint written by :func:`save_checkpoint`."""
    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    names = {"num_layers": "num_hidden_layers", "top_k": "num_experts_per_tok"}
    return ModelShape(**{f: cfg[names.get(f, f)] for f in ModelShape.__dataclass_fields__})


def load_checkpoint_weights(model, ckpt: Path, grown: int = 0) -> None:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` (strict).

    ``grown``: ``model`` has that many more layers than the checkpoint; see :func:`grow_layers`."""
    from safetensors.torch import load_file

    prefix = "model.language_model."
    state = {("model." + k[len(prefix):] if k.startswith(prefix) else k): v.float()
             for k, v in load_file(str(Path(ckpt) / "model.safetensors")).items()}
    if grown:
        interval = model.config.layer_types.index("full_attention") + 1
        state = grow_layers(state, len(model.model.layers) - grown, grown, interval)
    model.load_state_dict(state, strict=True)


# Output projections of a layer: zeroed, the layer adds nothing to the residual stream.
_OUTPUT_PROJECTIONS = ("self_attn.o_proj.weight", "linear_attn.out_proj.weight", "mlp.experts.down_proj",
                       "mlp.shared_expert.down_proj.weight")


def grow_layers(state: dict, layers: int, added: int, interval: int) -> dict:
    """``state`` of a ``layers``-layer model extended by ``added`` layers, computing the same function.

    The new layers are copies of the last ``added`` ones (so the layer pattern, full attention every
    ``interval``-th layer, continues) with their output projections zeroed: each starts as the
    identity and training gives it a role (block expansion, as LLaMA Pro does). A warm start keeps
    what the smaller model learned, where a deeper model from scratch would start over."""
    if added <= 0 or added % interval or added > layers:
        raise ValueError(f"can only add a multiple of the attention interval ({interval}) up to {layers} "
                         f"layers, got {added}")
    out = dict(state)
    for new in range(layers, layers + added):
        src = f"model.layers.{new - added}."
        for key, value in state.items():
            if key.startswith(src):
                name = key[len(src):]
                out[f"model.layers.{new}.{name}"] = (torch.zeros_like(value) if name in _OUTPUT_PROJECTIONS
                                                     else value.clone())
    return out


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def pick_experts_impl(model, requested: str, device, autocast, vocab: int) -> str:
    """The fastest experts implementation that runs here (grouped_mm needs a recent GPU)."""
    options = [requested] if requested != "auto" else (
        ["grouped_mm", "batched_mm", "eager"] if device.type == "cuda" else ["eager"])
    for impl in options:
        try:
            model.set_experts_implementation(impl)
            seqs = [(list(range(1, 65)), [0] * 32 + [1] * 32), (list(range(1, 41)), [1] * 40)]
            batch = to_device(collate(seqs, 0), device)
            with autocast():
                loss, _ = loss_fn(model, batch, 0)
            loss.backward()
            model.zero_grad(set_to_none=True)
            return impl
        except Exception as e:  # noqa: BLE001 - try the next implementation
            print(f"experts_implementation={impl} failed here: {type(e).__name__}: {e}", flush=True)
    raise RuntimeError("no experts implementation works on this device")


def parse_mix(text: str) -> dict[str, float]:
    """``qa=0.45,tool=0.35,...`` -> weights per corpus kind (unknown kinds are an error)."""
    mix = {}
    for part in text.split(","):
        kind, _, weight = part.partition("=")
        if kind not in data.KINDS or not weight:
            raise argparse.ArgumentTypeError(f"--mix: {part!r} is not KIND=WEIGHT with KIND in {data.KINDS}")
        mix[kind] = float(weight)
    return mix


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    p.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget of the whole run")
    p.add_argument("--tiny", action="store_true", help="toy model and data sizes (CPU tests)")
    p.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: budget only)")
    p.add_argument("--seed", type=int, default=0, help="data and init seed")
    p.add_argument("--vocab-size", type=int, default=None, help="BPE size (default 2048; tiny 768)")
    p.add_argument("--tokenizer", type=Path, default=None, help="use this tokenizer directory")
    p.add_argument("--init", type=Path, default=None,
                   help="continue training a checkpoint written by this script (its tokenizer, shape "
                        "and weights; a fresh optimizer and schedule: use another --seed for new data)")
    p.add_argument("--grow-layers", type=int, default=0,
                   help="with --init: append this many layers that start as the identity (see grow_layers)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-3)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=None, help="warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--mix", type=parse_mix, default=None,
                   help="task weights, e.g. qa=0.45,tool=0.35,json=0.12,chat=0.08 (default data.DEFAULT_MIX)")
    p.add_argument("--batch-tokens", type=int, default=None, help="tokens per batch, padding included")
    p.add_argument("--max-len", type=int, default=None, help="drop longer sequences")
    p.add_argument("--replay", type=int, default=None,
                   help="1: reuse a recent batch when the data workers lag (default: on, off with --tiny)")
    p.add_argument("--aux-coef", type=float, default=0.01, help="router load-balancing loss weight")
    p.add_argument("--workers", type=int, default=None, help="data workers (default: cores - 2, max 14)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    p.add_argument("--experts-impl", default="auto", help="auto, grouped_mm, batched_mm or eager")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of torch (tiny default: 1)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoder layers (experimental, not measured)")
    p.add_argument("--save-dtype", default="float16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--log-every", type=float, default=None, help="seconds between log lines")
    p.add_argument("--eval-every", type=float, default=None, help="seconds between held-out evals")
    for f in ModelShape.__dataclass_fields__:
        p.add_argument("--" + f.replace("_", "-"), type=int, default=None, dest=f)
    args = p.parse_args(argv)

    t_start = time.time()
    deadline = t_start + args.minutes * 60
    tiny_mode = args.tiny
    shape = TINY_SHAPE if tiny_mode else DEMO_SHAPE
    if args.init:
        shape = shape_of(args.init)
        shape.num_layers += args.grow_layers
    elif args.grow_layers:
        p.error("--grow-layers needs --init")
    shape = ModelShape(**{k: (getattr(args, k) if getattr(args, k) is not None else v)
                          for k, v in asdict(shape).items()})
    vocab_size = args.vocab_size or (768 if tiny_mode else 2048)
    lr = args.lr or 3e-3
    warmup = args.warmup if args.warmup is not None else (10 if tiny_mode else 100)
    batch_tokens = args.batch_tokens or (2048 if tiny_mode else 65536)
    max_len = args.max_len or (1024 if tiny_mode else 1536)
    log_every = args.log_every or (2.0 if tiny_mode else 15.0)
    eval_every = args.eval_every or (1e9 if tiny_mode else 60.0)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    workers = args.workers if args.workers is not None else (
        0 if tiny_mode else max(0, min(14, (os.cpu_count() or 2) - 2)))
    if args.threads or (tiny_mode and device.type == "cpu"):
        torch.set_num_threads(args.threads or 1)
    torch.manual_seed(args.seed)

    stop = {"flag": False}

    def on_signal(signum, frame):  # save what we have when the run is cut short
        print(f"signal {signum}: stopping and saving", flush=True)
        stop["flag"] = True

    for s in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(s, on_signal)
        except ValueError:  # not the main thread
            pass

    from transformers import AutoTokenizer

    work = Path(tempfile.mkdtemp(prefix="flashmoe-train-"))
    tok_dir = work / "tokenizer"
    if args.tokenizer or args.init:
        tok_dir.mkdir(parents=True)
        for name in TOKENIZER_FILES:
            if (Path(args.tokenizer or args.init) / name).is_file():
                shutil.copy(Path(args.tokenizer or args.init) / name, tok_dir / name)
    else:
        build_tokenizer(tok_dir, vocab_size=vocab_size, seed=args.seed,
                        n_examples=120 if tiny_mode else 3000)
    use_qwen_pipeline(tok_dir)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    eos_id = tok.convert_tokens_to_ids("<|im_end|>")
    pad_id = tok.convert_tokens_to_ids("<|endoftext|>")
    print(f"tokenizer: {len(tok)} tokens ({time.time() - t_start:.1f}s)", flush=True)

    model = make_model(shape, len(tok), eos_id, pad_id, args.aux_coef)
    if args.init:
        load_checkpoint_weights(model, args.init, args.grow_layers)
        print(f"weights from {args.init}", flush=True)
    model = model.to(device)
    counts = param_counts(model, shape)
    print("model:", json.dumps(asdict(shape)), flush=True)
    print("params:", json.dumps(counts), flush=True)
    use_amp = device.type == "cuda"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp)

    impl = pick_experts_impl(model, args.experts_impl, device, autocast, len(tok))
    print(f"experts_implementation: {impl}", flush=True)
    fla = any(m in sys.modules for m in ("fla", "causal_conv1d"))
    print(f"fast GatedDeltaNet kernels (fla / causal-conv1d): {'yes' if fla else 'no, torch fallback'}")
    if args.compile:
        for layer in model.model.layers:
            layer.compile(dynamic=True)

    decay, no_decay = [], []
    for n, p_ in model.named_parameters():
        (decay if p_.ndim >= 2 and "embed" not in n and "norm" not in n else no_decay).append(p_)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")

    eval_sets = held_out(tok, 4 if tiny_mode else 48, max_len)
    initial_eval = evaluate_loss(model, eval_sets, pad_id, device, autocast)
    print("initial held-out loss:", json.dumps({k: round(v, 4) for k, v in initial_eval.items()}), flush=True)
    pool = 64 if tiny_mode else max(256, 4 * batch_tokens // 400)
    dataset = Batches(str(tok_dir), args.seed, max_len, batch_tokens, pool, pad_id, args.mix)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                        prefetch_factor=4 if workers else None, persistent_workers=False)
    replay = args.replay if args.replay is not None else not tiny_mode
    feeder = Feeder(loader, replay, seed=args.seed)

    history, evals = [], []
    step, tokens, trained_tokens, seqs = 0, 0, 0, 0
    save_margin = 5.0 if tiny_mode else 20.0
    t_train = time.time()
    budget = max(1.0, deadline - save_margin - t_train)
    last_log, last_eval = t_train, t_train
    window_loss, window_n, window_tokens, window_t = 0.0, 0, 0, time.time()
    print(f"training for up to {budget:.0f}s on {device} ({workers} data workers), "
          f"{batch_tokens} tokens per batch", flush=True)
    model.train()
    while True:
        now = time.time()
        progress = (now - t_train) / budget
        if progress >= 1 or stop["flag"] or (args.steps and step >= args.steps):
            break
        scale = min(1.0, (step + 1) / warmup) * (
            args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
        for g in opt.param_groups:
            g["lr"] = lr * scale
        host = feeder.get()
        batch = to_device(host, device)
        with autocast():
            loss, ce = loss_fn(model, batch, pad_id)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        n_tokens = host["ids"].shape[0] * host["ids"].shape[1]
        tokens += n_tokens
        trained_tokens += len(host["pos"])
        seqs += host["ids"].shape[0]
        window_loss = window_loss + ce  # a device tensor: no sync until the log line
        window_n += 1
        window_tokens += n_tokens
        now = time.time()
        if now - last_log >= log_every:
            rate = window_tokens / (now - window_t)
            entry = {"step": step, "time": round(now - t_start, 1), "tokens": tokens, "sequences": seqs,
                     "loss": round(float(window_loss) / max(window_n, 1), 4), "lr": round(lr * scale, 6),
                     "tokens_per_s": round(rate), "fresh_batches": feeder.fresh,
                     "replayed_batches": feeder.replayed}
            history.append(entry)
            print(json.dumps(entry), flush=True)
            last_log, window_loss, window_n, window_tokens, window_t = now, 0.0, 0, 0, now
        if now - last_eval >= eval_every:
            losses = evaluate_loss(model, eval_sets, pad_id, device, autocast)
            ev = {"step": step, "time": round(now - t_start, 1),
                  **{k: round(v, 4) for k, v in losses.items()}}
            evals.append(ev)
            print("held-out loss:", json.dumps(ev), flush=True)
            last_eval = time.time()

    final_eval = evaluate_loss(model, eval_sets, pad_id, device, autocast)
    print("final held-out loss:", json.dumps({k: round(v, 4) for k, v in final_eval.items()}), flush=True)
    save_checkpoint(model, tok_dir, args.out, args.save_dtype)
    log = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "shape": asdict(shape), "params": counts, "vocab_size": len(tok), "device": str(device),
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "experts_implementation": impl, "fla": fla, "lr": lr, "batch_tokens": batch_tokens,
        "steps": step, "fresh_batches": feeder.fresh, "replayed_batches": feeder.replayed,
        "tokens": tokens, "trained_tokens": trained_tokens, "sequences": seqs,
        "train_seconds": round(time.time() - t_train, 1), "total_seconds": round(time.time() - t_start, 1),
        "history": history, "evals": evals, "initial_eval": initial_eval, "final_eval": final_eval,
    }
    (Path(args.out) / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    files = sorted(f.name for f in Path(args.out).iterdir())
    size = (Path(args.out) / "model.safetensors").stat().st_size
    print(f"saved {args.out}: {len(files)} files {files}; model.safetensors {size / 2**20:.2f} MiB; "
          f"{step} steps, {tokens / 1e6:.1f}M tokens in {time.time() - t_start:.0f}s", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return log


if __name__ == "__main__":
    main()
