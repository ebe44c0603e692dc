"""The demo model's tokenizer: a byte-level BPE trained on the synthetic corpus.

Same construction as :func:`tests.fixtures.tiny.build_tokenizer` (byte-level BPE, the Qwen
special tokens ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` and the markup tokens ``<think>``,
``</think>``, ``<tool_call>``... appended after the learned vocabulary, EOS ``<|im_end|>``, PAD
``<|endoftext|>``, no BOS, the Qwen3.5 XML chat template of tiny.py), but trained on rendered
conversations of :mod:`train.data` plus tiny.py's general corpus, so it can be larger than 512
tokens and compress the demo's conversations well.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from tests.fixtures import tiny


def _pieces(texts: Iterable[str], added: list[str]) -> Iterator[str]:
    """Texts with the special and markup tokens cut out (they are added whole afterwards)."""
    pattern = re.compile("|".join(re.escape(t) for t in added))
    for text in texts:
        for piece in pattern.split(text):
            if piece:
                yield piece


def render_tokenizer():
    """A tokenizer that only serves to render the chat template (tiny.py's 512-token one)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tiny.build_tokenizer(Path(tmp))
        return AutoTokenizer.from_pretrained(tmp)


def train_tokenizer_json(corpus: Iterable[str], vocab_size: int) -> str:
    """Train the byte-level BPE on ``corpus`` and return it as JSON (added tokens included).

    Unlike tiny.py's (GPT-2 style, a leading space merged into the word), every space is a token of
    its own: ``" Bucauk"`` in a document and ``"Bucauk"`` at the start of an answer then share their
    token ids, which makes grounded answers a plain copy for a small model (about 25% more tokens).
    The result uses Qwen3.5's own pipeline (see :func:`use_qwen_pipeline`).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    added = list(tiny.SPECIAL_TOKENS) + list(tiny.MARKUP_TOKENS)
    if vocab_size < 256 + len(added) + 1:
        raise ValueError(f"vocab_size must be at least {256 + len(added) + 1}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    # Trained on Qwen3.5's pieces with every space cut out as a piece of its own ("Ġ"): no merge
    # holds a space, so Qwen3.5's pipeline, which loaders apply, tokenizes the same way, and a
    # word has the same tokens wherever it stands (after a space in the document, first in the
    # answer), so answering is copying token ids.
    normalizer, pre_tokenizer = _qwen_pipeline()
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizer,
        pre_tokenizers.Split(Regex("\u0120"), behavior="isolated"),  # "Ġ", a space after ByteLevel
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(added),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_pieces(corpus, added), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tiny.SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in tiny.MARKUP_TOKENS])
    return _with_qwen_pipeline(tok).to_str()


def _qwen_pipeline():
    """Qwen3.5's normalizer and pre-tokenizer, as transformers' ``Qwen3_5Tokenizer`` builds them."""
    from transformers.models.qwen3_5.tokenization_qwen3_5 import Qwen3_5Tokenizer

    backend = Qwen3_5Tokenizer().backend_tokenizer
    return backend.normalizer, backend.pre_tokenizer


def _with_qwen_pipeline(tok):
    """``tok`` with Qwen3.5's normalizer and pre-tokenizer."""
    tok.normalizer, tok.pre_tokenizer = _qwen_pipeline()
    return tok


def use_qwen_pipeline(tok_dir: Path) -> None:
    """Make ``tok_dir`` tokenize the way every loader of a Qwen3.5 checkpoint will.

    transformers' ``AutoTokenizer`` (and so mlx-lm) builds a ``qwen3_5_moe`` checkpoint's tokenizer
    as ``Qwen3_5Tokenizer``: its vocabulary and merges with Qwen3.5's own pre-tokenizer (single
    digits), whatever ``tokenizer.json`` says. Training must see the same tokens, so this rewrites
    ``tokenizer.json`` with that pipeline and adds the ``config.json`` that makes ``AutoTokenizer``
    pick that class.
    """
    from tokenizers import Tokenizer

    path = Path(tok_dir) / "tokenizer.json"
    path.write_text(_with_qwen_pipeline(Tokenizer.from_file(str(path))).to_str())
    config = Path(tok_dir) / "config.json"
    if not config.exists():
        config.write_text('{"model_type": "qwen3_5_moe"}\n')


def build_tokenizer(out_dir: Path, vocab_size: int = 2048, seed: int = 0, corpus: Iterable[str] | None = None,
                    n_examples: int = 3000) -> Path:
    """Train the tokenizer and save it with tiny.py's Qwen3.5 XML chat template in ``out_dir``.

    ``corpus`` defaults to ``n_examples`` rendered conversations of :mod:`train.data` (``seed``)
    plus tiny.py's general corpus. ``vocab_size <= 512`` with no corpus gives tiny.py's own
    tokenizer. Deterministic for given arguments. Writes ``tokenizer.json``,
    ``tokenizer_config.json`` and ``chat_template.jinja``; returns ``out_dir``.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from train import data

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if corpus is None and vocab_size <= 512:
        return tiny.build_tokenizer(out_dir, vocab_size=vocab_size, seed=seed)
    if corpus is None:
        renderer = render_tokenizer()
        corpus = list(data.corpus_texts(renderer, seed, n_examples)) + tiny.corpus(seed)
    tok = Tokenizer.from_str(train_tokenizer_json(corpus, vocab_size))
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    hf_tok.chat_template = tiny.chat_template("xml")
    hf_tok.save_pretrained(str(out_dir))
    return out_dir
