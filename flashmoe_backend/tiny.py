"""Tiny random-weight fixture models, built on the fly.

The tests and ``flashmoe demo`` need real checkpoints of the architectures we stream (Qwen3.5-MoE,
Qwen3-Next, Qwen3-MoE) without downloading anything. This module builds them locally:

* :func:`build_tokenizer` trains a small byte-level BPE tokenizer on a built-in corpus and writes
  it, with the Qwen special tokens and a Qwen-style chat template of our own, in the Hugging Face
  format (loadable by ``transformers.AutoTokenizer`` and by ``mlx_lm``).
* :func:`build_tiny_checkpoint` builds a random model with transformers' own classes and saves it
  in the on-disk layout the real Hugging Face checkpoints use, so that packing code sees what it
  will see on a real model. ``mlx_lm.load`` reproduces transformers' logits (fp32, ~1e-5).
* :func:`build_quantized_checkpoint` runs ``mlx_lm.convert`` to make the mlx-community style
  quantized copy (experts stacked under ``switch_mlp``, router and shared-expert gate at 8 bits).

torch and transformers are imported lazily: importing this module is cheap.
"""

from __future__ import annotations

import functools
import json
import random
import shutil
from pathlib import Path
from typing import Any, Literal

Arch = Literal["qwen3_5_moe", "qwen3_next", "qwen3_moe"]
ToolFormat = Literal["xml", "hermes"]

ARCHS: tuple[str, ...] = ("qwen3_5_moe", "qwen3_next", "qwen3_moe")
# Embedding and LM-head weights are initialised at this multiple of ``init_std``.
_OUTER_SCALE = 3.0

#: Special tokens (never shown by ``decode(..., skip_special_tokens=True)``).
SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
#: Added tokens that are single tokens but not special, so they survive decoding (as in Qwen).
MARKUP_TOKENS: tuple[str, ...] = (
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
)

# --------------------------------------------------------------------------------------------
# Chat templates
#
# Written for these fixtures (not copied from Qwen). Both render the same conversation format;
# they differ only in how tools are announced and how tool calls are written. Every output goes
# through ``{{- ... }}`` so the result does not depend on the environment's whitespace options.
# --------------------------------------------------------------------------------------------

_TEMPLATE_COMMON_MACROS = r"""
{%- macro render_text(content) %}
    {%- if content is string %}
        {{- content }}
    {%- elif content is mapping %}
        {%- if content.text is defined %}
            {{- content.text }}
        {%- endif %}
    {%- elif content is iterable %}
        {%- for part in content %}
            {%- if part is string %}
                {{- part }}
            {%- elif part is mapping and part.text is defined %}
                {{- part.text }}
            {%- endif %}
        {%- endfor %}
    {%- elif content is defined and content is not none %}
        {{- content | string }}
    {%- endif %}
{%- endmacro %}
"""

# XML (Qwen3.5 / Qwen3-Coder) tool calls. Arguments given as a JSON string are parsed by a small
# character-level state machine (top-level keys only; nested values are copied as JSON text).
_TEMPLATE_XML_MACROS = r"""
{%- macro xml_value(value) %}
    {%- if value is string %}
        {{- value }}
    {%- else %}
        {{- value | tojson }}
    {%- endif %}
{%- endmacro %}
{%- macro xml_params_from_json(text) %}
    {%- set st = namespace(depth=0, in_str=false, esc=false, uni=0, hex='', key=none, raw='',
                           dec='', out='') %}
    {%- for c in text %}
        {%- if st.in_str %}
            {%- set st.raw = st.raw + c %}
            {%- if st.uni > 0 %}
                {%- set st.hex = st.hex + c %}
                {%- set st.uni = st.uni - 1 %}
                {%- if st.uni == 0 %}
                    {%- set st.dec = st.dec + ('%c' | format(st.hex | int(base=16))) %}
                {%- endif %}
            {%- elif st.esc %}
                {%- set st.esc = false %}
                {%- if c == 'u' %}
                    {%- set st.uni = 4 %}
                    {%- set st.hex = '' %}
                {%- else %}
                    {%- set st.dec = st.dec + {'n': '\n', 't': '\t', 'r': '\r', 'b': '\b',
                                               'f': '\f'}.get(c, c) %}
                {%- endif %}
            {%- elif c == '\\' %}
                {%- set st.esc = true %}
            {%- elif c == '"' %}
                {%- set st.in_str = false %}
            {%- else %}
                {%- set st.dec = st.dec + c %}
            {%- endif %}
        {%- elif c == '"' %}
            {%- set st.in_str = true %}
            {%- set st.raw = st.raw + c %}
        {%- elif c == '{' or c == '[' %}
            {%- set st.depth = st.depth + 1 %}
            {%- if st.depth > 1 %}
                {%- set st.raw = st.raw + c %}
            {%- endif %}
        {%- elif st.depth == 1 and (c == ',' or c == '}' or c == ']') %}
            {%- if st.key is not none %}
                {%- set value = st.raw | trim %}
                {%- if value[:1] == '"' %}
                    {%- set value = st.dec %}
                {%- endif %}
                {%- set st.out = st.out + '<parameter=' + st.key + '>\n' + value
                                 + '\n</parameter>\n' %}
            {%- endif %}
            {%- set st.key = none %}
            {%- set st.raw = '' %}
            {%- set st.dec = '' %}
            {%- if c != ',' %}
                {%- set st.depth = 0 %}
            {%- endif %}
        {%- elif c == '}' or c == ']' %}
            {%- set st.depth = st.depth - 1 %}
            {%- set st.raw = st.raw + c %}
        {%- elif c == ':' and st.depth == 1 and st.key is none %}
            {%- set st.key = st.dec %}
            {%- set st.raw = '' %}
            {%- set st.dec = '' %}
        {%- elif st.depth > 0 %}
            {%- set st.raw = st.raw + c %}
        {%- endif %}
    {%- endfor %}
    {{- st.out }}
{%- endmacro %}
{%- macro render_tool_call(tool_call) %}
    {{- '<tool_call>\n<function=' + tool_call.name + '>\n' }}
    {%- if tool_call.arguments is mapping %}
        {%- for name, value in tool_call.arguments | items %}
            {{- '<parameter=' + name + '>\n' + xml_value(value) + '\n</parameter>\n' }}
        {%- endfor %}
    {%- elif tool_call.arguments is string %}
        {{- xml_params_from_json(tool_call.arguments) }}
    {%- endif %}
    {{- '</function>\n</tool_call>' }}
{%- endmacro %}
"""

_XML_INSTRUCTIONS = (
    "To call a function, write a block in exactly this format:\\n\\n"
    "<tool_call>\\n<function=NAME>\\n<parameter=P>\\nVALUE\\n</parameter>\\n</function>\\n"
    "</tool_call>\\n\\n"
    "- NAME is one of the functions above and each P one of its parameters; "
    "give every required parameter, one <parameter=...> block each.\\n"
    "- A VALUE is plain text and may span several lines; write objects and arrays as JSON.\\n"
    "- For several calls, write several <tool_call> blocks one after another.\\n"
    "- Write nothing after the last </tool_call>. Results come back inside "
    "<tool_response></tool_response>."
)

# Hermes / Qwen3-Next JSON tool calls.
_TEMPLATE_HERMES_MACROS = r"""
{%- macro render_tool_call(tool_call) %}
    {{- '<tool_call>\n{"name": ' + (tool_call.name | tojson) + ', "arguments": ' }}
    {%- if tool_call.arguments is string %}
        {{- tool_call.arguments }}
    {%- elif tool_call.arguments is defined %}
        {{- tool_call.arguments | tojson }}
    {%- else %}
        {{- '{}' }}
    {%- endif %}
    {{- '}\n</tool_call>' }}
{%- endmacro %}
"""

_HERMES_INSTRUCTIONS = (
    "To call a function, write one JSON object with its name and its arguments inside "
    "<tool_call></tool_call> tags:\\n\\n"
    '<tool_call>\\n{"name": <function-name>, "arguments": <arguments-as-a-JSON-object>}\\n'
    "</tool_call>\\n\\n"
    "- For several calls, write several <tool_call> blocks one after another.\\n"
    "- Write nothing after the last </tool_call>. Results come back inside "
    "<tool_response></tool_response>."
)

_TEMPLATE_BODY = r"""
{%- set head = namespace(start=0, system='') %}
{%- if messages and messages[0].role == 'system' %}
    {%- set head.start = 1 %}
    {%- set head.system = render_text(messages[0].content) %}
{%- endif %}
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if head.system %}
        {{- head.system + '\n\n' }}
    {%- endif %}
    {{- '# Tools\n\nYou may call one or more functions to help with the request. '
        + 'Each function is described by one JSON object per line inside <tools></tools>:'
        + '\n\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + (tool | tojson) }}
    {%- endfor %}
    {{- '\n</tools>\n\n' + '@@INSTRUCTIONS@@' + '<|im_end|>\n' }}
{%- elif head.start == 1 %}
    {{- '<|im_start|>system\n' + head.system + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages[head.start:] %}
    {%- if message.role == 'tool' %}
        {%- if loop.first or loop.previtem.role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + render_text(message.content) + '\n</tool_response>' }}
        {%- if loop.last or loop.nextitem.role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant\n' }}
        {%- if message.reasoning_content is string and message.reasoning_content | trim %}
            {{- '<think>\n' + (message.reasoning_content | trim) + '\n</think>\n\n' }}
        {%- endif %}
        {%- set content = render_text(message.content) %}
        {{- content }}
        {%- if message.tool_calls %}
            {%- for call in message.tool_calls %}
                {%- if not loop.first %}
                    {{- '\n' }}
                {%- elif content %}
                    {{- '\n\n' }}
                {%- endif %}
                {{- render_tool_call(call.function if call.function is defined else call) }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + render_text(message.content) + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- else %}
        {{- '<think>\n' }}
    {%- endif %}
{%- endif %}
"""


def chat_template(tool_format: ToolFormat = "xml") -> str:
    """Return the Jinja chat template of the fixtures.

    ``"xml"`` is the Qwen3.5 format (``<tool_call>\\n<function=NAME>\\n<parameter=P>...``),
    ``"hermes"`` the Qwen3-Next / Hermes one (``<tool_call>\\n{"name": .., "arguments": ..}``).
    The turn format (``<|im_start|>role\\n...<|im_end|>\\n``, tool results as
    ``<tool_response>`` blocks in a user turn, ``reasoning_content`` as a ``<think>`` block,
    ``enable_thinking``) is the same for both.
    """
    if tool_format == "xml":
        macros, instructions = _TEMPLATE_XML_MACROS, _XML_INSTRUCTIONS
    elif tool_format == "hermes":
        macros, instructions = _TEMPLATE_HERMES_MACROS, _HERMES_INSTRUCTIONS
    else:
        raise ValueError(f"unknown tool_format {tool_format!r}; expected 'xml' or 'hermes'")
    body = _TEMPLATE_BODY.replace("@@INSTRUCTIONS@@", instructions)
    return (_TEMPLATE_COMMON_MACROS + macros + body).strip() + "\n"


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

_NAMES = ["Alice", "Bob", "Carol", "Dmitri", "Esther", "Farid", "Grace", "Hiro", "Ines", "Jamal"]
_CITIES = ["Paris", "Tokyo", "Lagos", "Lima", "Oslo", "Cairo", "Berlin", "Austin", "Seoul", "Perth"]
_NOUNS = [
    "model", "expert", "layer", "token", "cache", "disk", "memory", "router", "weight", "prompt",
    "answer", "question", "document", "function", "tool", "result", "file", "server", "request",
    "river", "mountain", "library", "garden", "kitchen", "window", "planet", "engine", "report",
]
_VERBS = [
    "reads", "writes", "loads", "streams", "checks", "finds", "sends", "returns", "builds",
    "computes", "stores", "answers", "calls", "opens", "closes", "counts", "moves", "sorts",
]
_ADJS = [
    "small", "large", "fast", "slow", "random", "quiet", "bright", "old", "new", "green", "empty",
    "full", "warm", "cold", "simple", "careful", "sparse", "dense", "local", "remote",
]
_ADVS = ["quickly", "slowly", "carefully", "often", "rarely", "again", "today", "later", "now"]
_WORDS = _NOUNS + _VERBS + _ADJS + _ADVS + ["the", "a", "of", "and", "to", "in", "is", "for"]
_TOOLS = ["get_weather", "search", "add", "lookup_user", "send_email", "read_file", "convert"]
_KEYS = ["name", "city", "age", "query", "unit", "items", "id", "count", "value", "enabled"]


def _json_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(7 if depth < 2 else 5)
    if kind == 0:
        return rng.randint(-1000, 100000)
    if kind == 1:
        return round(rng.uniform(-100, 100), rng.randint(1, 4))
    if kind == 2:
        return rng.choice([True, False, None])
    if kind in (3, 4):
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 4)))
    if kind == 5:
        return [_json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {k: _json_value(rng, depth + 1) for k in rng.sample(_KEYS, rng.randint(1, 3))}


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(["The", "A", "Every", "One", "This"]), rng.choice(_ADJS), rng.choice(_NOUNS)]
    words += [rng.choice(_VERBS), rng.choice(["the", "a", "each"]), rng.choice(_NOUNS)]
    if rng.random() < 0.5:
        words += [rng.choice(["in", "near", "from", "to"]), rng.choice(_CITIES)]
    if rng.random() < 0.4:
        words.append(rng.choice(_ADVS))
    return " ".join(words) + rng.choice([".", ".", "!", "?", ";", "..."])


def _corpus(seed: int) -> list[str]:
    """A deterministic corpus of English-ish text, JSON, tool calls, markup, digits and code."""
    rng = random.Random(seed)
    lines: list[str] = []
    for _ in range(300):
        lines.append(" ".join(_sentence(rng) for _ in range(rng.randint(1, 3))))
    for _ in range(120):
        name, city = rng.choice(_NAMES), rng.choice(_CITIES)
        n = rng.randint(0, 9999)
        lines.append(
            rng.choice(
                [
                    f"{name} lives in {city} and has {n} books.",
                    f"Q: What is {n} + {n % 97}? A: {n + n % 97}.",
                    f'{name} said: "The {rng.choice(_NOUNS)} is {rng.choice(_ADJS)}."',
                    f"On {rng.randint(1, 28):02d}/{rng.randint(1, 12):02d}/{rng.randint(1990, 2030)}"
                    f" at {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}, it was "
                    f"{rng.uniform(-10, 40):.1f} C in {city}.",
                    f"Step {rng.randint(1, 9)}: call `{rng.choice(_TOOLS)}()` (then wait).",
                    f"- item {n}: {rng.choice(_ADJS)} {rng.choice(_NOUNS)} [{n % 7}] #{n % 13}",
                ]
            )
        )
    for _ in range(150):
        obj = {k: _json_value(rng) for k in rng.sample(_KEYS, rng.randint(1, 4))}
        indent = rng.choice([None, None, 2])
        lines.append(json.dumps(obj, indent=indent))
    for _ in range(80):
        tool = rng.choice(_TOOLS)
        args = {k: _json_value(rng, 1) for k in rng.sample(_KEYS, rng.randint(1, 3))}
        if rng.random() < 0.5:
            lines.append(
                "<tool_call>\n" + json.dumps({"name": tool, "arguments": args}) + "\n</tool_call>"
            )
        else:
            params = "".join(
                f"<parameter={k}>\n{v if isinstance(v, str) else json.dumps(v)}\n</parameter>\n"
                for k, v in args.items()
            )
            lines.append(f"<tool_call>\n<function={tool}>\n{params}</function>\n</tool_call>")
        lines.append(f"<tool_response>\n{json.dumps(_json_value(rng))}\n</tool_response>")
    for _ in range(40):
        lines.append(f"<think>\n{_sentence(rng)} {_sentence(rng)}\n</think>\n\n{_sentence(rng)}")
        tag = rng.choice(["div", "span", "p", "item", "tools", "note"])
        lines.append(f'<{tag} id="{rng.randint(0, 99)}">{_sentence(rng)}</{tag}>')
    for _ in range(60):
        a, b = rng.randint(0, 10**6), rng.randint(0, 10**6)
        lines.append(
            rng.choice(
                [
                    f"def f_{a % 100}(x, y={b % 10}):\n    return [x * {a % 9}, y] if x else {{}}",
                    f"if (a[{a % 10}] >= {b}) {{ x += {a}; }} else {{ y = '{rng.choice(_NOUNS)}'; }}",
                    f"{a} {b} {a * b} {a - b} 0x{a:x} {a / max(b, 1):.6f} 1e-{a % 9} -{b}%",
                    f"path/to/{rng.choice(_NOUNS)}_{a % 50}.json: {{\"ok\": true, \"n\": {b}}}",
                    f"SELECT {rng.choice(_KEYS)} FROM t WHERE id = {a} AND x <> '{b}';",
                ]
            )
        )
    rng.shuffle(lines)
    return lines


@functools.lru_cache(maxsize=8)
def _trained_tokenizer_json(vocab_size: int, seed: int) -> str:
    """Train the byte-level BPE model and return the tokenizer as JSON (cached per process)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    n_added = len(SPECIAL_TOKENS) + len(MARKUP_TOKENS)
    if vocab_size < 256 + n_added + 1:
        raise ValueError(f"vocab_size must be at least {256 + n_added + 1}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_added,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    # Appended after the BPE vocabulary, like Qwen's (ids >= the base vocabulary).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    return tok.to_str()


def build_tokenizer(
    out_dir: Path,
    vocab_size: int = 512,
    seed: int = 0,
    tool_format: ToolFormat = "xml",
) -> Path:
    """Train a small byte-level BPE tokenizer and save it, with a chat template, in ``out_dir``.

    The vocabulary (``vocab_size`` tokens when the corpus allows that many merges) holds the 256
    byte tokens, the learned merges, the special tokens ``<|endoftext|>``, ``<|im_start|>``,
    ``<|im_end|>`` and the non-special added tokens ``<think>``, ``</think>``, ``<tool_call>``,
    ``</tool_call>``, ``<tool_response>``, ``</tool_response>``. EOS is ``<|im_end|>``, PAD
    ``<|endoftext|>``, there is no BOS. The chat template is :func:`chat_template(tool_format)
    <chat_template>`. Deterministic for a given ``(vocab_size, seed)``; needs no network.

    Returns ``out_dir``.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_str(_trained_tokenizer_json(vocab_size, seed))
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    hf_tok.chat_template = chat_template(tool_format)
    hf_tok.save_pretrained(str(out_dir))
    return out_dir


def build_hermes_tokenizer(out_dir: Path, vocab_size: int = 512, seed: int = 0) -> Path:
    """:func:`build_tokenizer` with the Qwen3-Next / Hermes JSON tool-call template."""
    return build_tokenizer(out_dir, vocab_size=vocab_size, seed=seed, tool_format="hermes")


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _model_and_config(
    arch: str,
    *,
    vocab_size: int,
    num_layers: int,
    num_experts: int,
    top_k: int,
    hidden_size: int,
    moe_intermediate_size: int,
    eos_token_id: int,
    pad_token_id: int,
    init_std: float,
) -> Any:
    """Instantiate a random transformers model of ``arch`` (on the current torch seed)."""
    import transformers

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=moe_intermediate_size,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        initializer_range=init_std,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    hybrid: dict[str, Any] = dict(
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        shared_expert_intermediate_size=moe_intermediate_size,
        full_attention_interval=4,
    )
    if arch == "qwen3_5_moe":
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
        cfg = transformers.Qwen3_5MoeTextConfig(**common, **hybrid, rope_parameters=rope)
        return transformers.Qwen3_5MoeForCausalLM(cfg)
    if arch == "qwen3_next":
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
        cfg = transformers.Qwen3NextConfig(
            **common,
            **hybrid,
            rope_parameters=rope,
            intermediate_size=4 * hidden_size,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
        )
        return transformers.Qwen3NextForCausalLM(cfg)
    if arch == "qwen3_moe":
        rope = {"rope_type": "default", "rope_theta": 10000.0}
        cfg = transformers.Qwen3MoeConfig(
            **common,
            rope_parameters=rope,
            intermediate_size=4 * hidden_size,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
        )
        return transformers.Qwen3MoeForCausalLM(cfg)
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def _write_safetensors(path: Path, tensors: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt"})


def build_tiny_checkpoint(
    out_dir: Path,
    arch: Arch = "qwen3_5_moe",
    *,
    seed: int = 0,
    num_layers: int = 4,
    num_experts: int = 16,
    top_k: int = 4,
    hidden_size: int = 64,
    moe_intermediate_size: int = 32,
    tool_format: ToolFormat | None = None,
    dtype: str = "float32",
    vocab_size: int = 512,
    init_std: float = 0.05,
) -> Path:
    """Build a tiny random ``arch`` model and save it as a Hugging Face checkpoint in ``out_dir``.

    The model is a transformers ``Qwen3_5MoeForCausalLM`` / ``Qwen3NextForCausalLM`` /
    ``Qwen3MoeForCausalLM`` with random weights (``torch.manual_seed(seed)``; std ``init_std`` in
    the blocks and 3x that in the embedding and LM head, so logits have std ~1.2 and greedy decoding
    varies; norm weights jittered so that a mix-up of norm conventions shows): 4 q heads, 2 kv
    heads, head dim 16; for the hybrid archs GatedDeltaNet layers with a full-attention layer every
    4th (2 key heads, 4 value heads, dims 16, conv 4) and a shared expert of
    ``moe_intermediate_size``.

    The directory uses the real checkpoints' layout:

    * ``qwen3_5_moe``: ``config.json`` with ``model_type: qwen3_5_moe``,
      ``architectures: [Qwen3_5MoeForConditionalGeneration]`` and the text settings nested in
      ``text_config``; tensors under ``model.language_model.*`` plus ``lm_head.weight``; experts
      fused per layer as ``mlp.experts.gate_up_proj`` [E, 2I, H] and ``mlp.experts.down_proj``
      [E, H, I]. (No vision tower and no ``mtp.*`` tensors.)
    * ``qwen3_next`` / ``qwen3_moe``: flat config, tensors under ``model.*``, one tensor per expert
      (``mlp.experts.{e}.{gate,up,down}_proj.weight``); Qwen3-Next linear attention uses the fused
      ``in_proj_qkvz`` / ``in_proj_ba`` projections.

    plus the tokenizer of :func:`build_tokenizer` (always trained with seed 0, so all fixtures
    share token ids; ``tool_format`` defaults to ``"xml"`` for Qwen3.5 and ``"hermes"`` for the
    others; the model's vocabulary is the tokenizer's size, ``vocab_size``) and a
    ``generation_config.json`` whose ``eos_token_id`` is ``<|im_end|>``. ``dtype`` is the saved
    dtype (``"float32"``, ``"bfloat16"`` or ``"float16"``). Returns ``out_dir``.
    """
    import torch
    from transformers import AutoTokenizer

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in torch_dtype:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(torch_dtype)}")
    if tool_format is None:
        tool_format = "xml" if arch == "qwen3_5_moe" else "hermes"

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # One tokenizer for every fixture (the seed only changes the weights).
    build_tokenizer(out_dir, vocab_size=vocab_size, seed=0, tool_format=tool_format)
    tok = AutoTokenizer.from_pretrained(str(out_dir))
    eos_id = tok.convert_tokens_to_ids("<|im_end|>")
    pad_id = tok.convert_tokens_to_ids("<|endoftext|>")

    torch.manual_seed(seed)
    model = _model_and_config(
        arch,
        vocab_size=len(tok),
        num_layers=num_layers,
        num_experts=num_experts,
        top_k=top_k,
        hidden_size=hidden_size,
        moe_intermediate_size=moe_intermediate_size,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        init_std=init_std,
    )
    model = model.float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        # Spread the logits (std ~1.2) without making the blocks numerically touchy: with block
        # weights at std >= 0.1, the GatedDeltaNet layers amplify rounding so much that
        # transformers' chunked prefill and its own token-by-token path disagree by ~1e-4.
        model.get_input_embeddings().weight.mul_(_OUTER_SCALE)
        model.get_output_embeddings().weight.mul_(_OUTER_SCALE)
    model = model.to(torch_dtype[dtype])

    # Config and weights. transformers 5 saves the fused experts it holds in memory
    # (`experts.gate_up_proj` / `experts.down_proj`) split back into one tensor per expert for all
    # three archs. That is the real layout of Qwen3-Next and Qwen3-MoE checkpoints, so those are
    # saved as is; real Qwen3.5 checkpoints keep experts fused (and nest everything under the
    # vision-language wrapper), so for Qwen3.5 we write the safetensors and config ourselves.
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(out_dir))
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    config = json.loads((out_dir / "config.json").read_text())
    if arch == "qwen3_5_moe":
        for f in out_dir.glob("model*.safetensors*"):
            f.unlink()
        tensors = {}
        for key, value in model.state_dict().items():
            if key.startswith("model."):
                key = "model.language_model." + key[len("model.") :]
            tensors[key] = value
        _write_safetensors(out_dir / "model.safetensors", tensors)
        text_config = {k: v for k, v in config.items() if k not in ("architectures",)}
        config = {
            "architectures": ["Qwen3_5MoeForConditionalGeneration"],
            "model_type": "qwen3_5_moe",
            "text_config": text_config,
            "tie_word_embeddings": False,
            "transformers_version": config.get("transformers_version"),
        }
    else:
        # Real Qwen3-Next / Qwen3-MoE configs are flat and carry rope_theta (and the partial
        # rotary factor) at the top level, and Qwen3-MoE names the expert count `num_experts`;
        # transformers 5 writes `rope_parameters` and `num_local_experts` instead, which mlx-lm's
        # ModelArgs for these archs do not read.
        rope = config.get("rope_parameters") or {}
        config["rope_theta"] = rope.get("rope_theta", 10000.0)
        if "partial_rotary_factor" in rope:
            config["partial_rotary_factor"] = rope["partial_rotary_factor"]
        config["num_experts"] = num_experts
        config.pop("num_local_experts", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation_config = {
        "bos_token_id": pad_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "do_sample": False,
    }
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    return out_dir


def build_quantized_checkpoint(
    hf_dir: Path, out_dir: Path, bits: int = 4, group_size: int = 32
) -> Path:
    """Quantize the HF checkpoint in ``hf_dir`` with ``mlx_lm.convert`` into ``out_dir``.

    The result is laid out like the mlx-community checkpoints: experts stacked as
    ``...mlp.switch_mlp.{gate,up,down}_proj.{weight,scales,biases}`` [E, ...], affine
    quantization with ``bits`` / ``group_size`` (the router ``mlp.gate`` and
    ``shared_expert_gate`` at 8 bits, group 64, as mlx-lm's predicates for these archs ask),
    float32 for what stays unquantized. ``group_size`` must divide the quantized input dims
    (``hidden_size`` and ``moe_intermediate_size``; with the defaults 64 and 32, use 32); layers
    whose input dim it does not divide are silently left unquantized by mlx-lm (e.g. the expert
    ``down_proj`` at group 64 with ``moe_intermediate_size=32``; build with 64 to mimic the
    mlx-community group-64 files). The 8-bit router needs ``hidden_size`` to be a multiple of 64.
    Bits 2, 3, 4, 5, 6 and 8 all work. ``out_dir`` must not exist or be empty. Returns
    ``out_dir``.
    """
    from mlx_lm import convert

    out_dir = Path(out_dir)
    if out_dir.exists():
        if any(out_dir.iterdir()):
            raise FileExistsError(f"{out_dir} exists and is not empty")
        out_dir.rmdir()
    convert(
        str(hf_dir),
        str(out_dir),
        quantize=True,
        q_bits=bits,
        q_group_size=group_size,
        dtype="float32",
    )
    # mlx_lm.convert saves the tokenizer; keep the original generation settings too.
    src = Path(hf_dir) / "generation_config.json"
    if src.exists() and not (out_dir / "generation_config.json").exists():
        shutil.copy(src, out_dir / "generation_config.json")
    return out_dir
