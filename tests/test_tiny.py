"""The tiny fixture builders: tokenizer, chat templates, HF checkpoints, mlx-lm conversions."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors import safe_open

from tests.fixtures.tiny import (
    ARCHS,
    MARKUP_TOKENS,
    SPECIAL_TOKENS,
    _trained_tokenizer_json,
    build_tiny_checkpoint,
    chat_template,
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]
ARGS = {"city": 'Lyon "centre"\nFrance é', "days": 2, "opts": {"unit": "C", "l": [1, 2]},
        "flag": True, "none": None}
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris and Lyon?"},
    {
        "role": "assistant",
        "content": "Checking.",
        "reasoning_content": "  I need the tool twice.\n",
        "tool_calls": [
            {"type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": ARGS}},
        ],
    },
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "tool", "content": '{"temp": 18}'},
    {"role": "assistant", "content": "Paris 21 C, Lyon 18 C."},
    {"role": "user", "content": [{"type": "text", "text": "Thanks!"}]},
]


def _with_string_arguments(messages):
    out = json.loads(json.dumps(messages))
    for call in out[2]["tool_calls"]:
        call["function"]["arguments"] = json.dumps(call["function"]["arguments"])
    return out


def _hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


# ------------------------------------------------------------------ tokenizer


def test_tokenizer_vocab_and_round_trip(tiny_tokenizer_dir):
    tok = _hf_tokenizer(tiny_tokenizer_dir("xml"))
    assert len(tok) == 512
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS + MARKUP_TOKENS}
    # Added after the BPE vocabulary, as in Qwen, and each one a single token.
    assert sorted(ids.values()) == list(range(512 - len(ids), 512))
    for token, i in ids.items():
        assert tok.encode(token, add_special_tokens=False) == [i]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None

    text = (
        '<|im_start|>user\nSay {"a": [1, 2.5e-3, "x\\"y"], "b": null} & <b>ok</b>\t~ 日本 🙂'
        "<|im_end|>\n<|im_start|>assistant\n<think>\nhmm\n</think>\n\n<tool_call>\n"
        "<function=f>\n<parameter=p>\n42\n</parameter>\n</function>\n</tool_call><|im_end|>"
        "\n<|im_start|>user\n<tool_response>\n{}\n</tool_response><|im_end|>"
    )
    enc = tok.encode(text, add_special_tokens=False)
    assert tok.decode(enc) == text
    visible = tok.decode(enc, skip_special_tokens=True)
    assert "<|im_start|>" not in visible and "<|im_end|>" not in visible
    for markup in MARKUP_TOKENS:  # not special: survive decoding, like Qwen's
        assert markup in visible
    # JSON and prose compress below one token per byte with the learned merges.
    prose = 'The small model reads the cache. {"name": "get_weather", "arguments": {"city": "Oslo"}}'
    assert len(tok.encode(prose)) < 0.7 * len(prose.encode())


def test_tokenizer_training_is_deterministic():
    train = _trained_tokenizer_json.__wrapped__
    assert train(400, 0) == train(400, 0)
    assert train(400, 0) != train(400, 1)


# ------------------------------------------------------------------ chat templates


def test_xml_template_renders_conversation(tiny_tokenizer_dir):
    tok = _hf_tokenizer(tiny_tokenizer_dir("xml"))
    template = chat_template("xml")
    assert "<function=" in template and "<tool_call>\\n<function=" in template
    text = tok.apply_chat_template(CONVERSATION, tools=TOOLS, tokenize=False,
                                   add_generation_prompt=True)
    system, rest = text.split("<|im_end|>\n", 1)
    assert system.startswith("<|im_start|>system\nYou are terse.\n\n# Tools\n")
    assert "\n<tools>\n" + json.dumps(TOOLS[0]) + "\n</tools>\n" in system
    assert "<tool_call>\n<function=NAME>\n<parameter=P>\nVALUE\n</parameter>\n</function>\n" \
           "</tool_call>" in system
    expected = (
        "<|im_start|>user\nWeather in Paris and Lyon?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nI need the tool twice.\n</think>\n\nChecking.\n\n"
        "<tool_call>\n<function=get_weather>\n"
        "<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n"
        "</function>\n</tool_call>\n"
        "<tool_call>\n<function=get_weather>\n"
        '<parameter=city>\nLyon "centre"\nFrance é\n</parameter>\n'
        "<parameter=days>\n2\n</parameter>\n"
        '<parameter=opts>\n{"unit": "C", "l": [1, 2]}\n</parameter>\n'
        "<parameter=flag>\ntrue\n</parameter>\n<parameter=none>\nnull\n</parameter>\n"
        "</function>\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response>\n"
        "<tool_response>\n{\"temp\": 18}\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nParis 21 C, Lyon 18 C.<|im_end|>\n"
        "<|im_start|>user\nThanks!<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )
    assert rest == expected
    # Arguments given as JSON strings (OpenAI style) render exactly like dicts.
    again = tok.apply_chat_template(_with_string_arguments(CONVERSATION), tools=TOOLS,
                                    tokenize=False, add_generation_prompt=True)
    assert again == text


def test_hermes_template_renders_conversation(tiny_tokenizer_dir):
    tok = _hf_tokenizer(tiny_tokenizer_dir("hermes"))
    template = chat_template("hermes")
    assert "<function=" not in template and '"arguments"' in template
    text = tok.apply_chat_template(CONVERSATION, tools=TOOLS, tokenize=False,
                                   add_generation_prompt=True)
    assert "<function=" not in text
    assert '<tool_call>\n{"name": <function-name>, "arguments": ' in text
    call = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n'
            "</tool_call>\n<tool_call>\n")
    assert "<think>\nI need the tool twice.\n</think>\n\nChecking.\n\n" + call in text
    # Each rendered call is valid JSON with the original arguments, dict or JSON string alike.
    assert _hermes_arguments(text) == [{"city": "Paris", "days": 3}, ARGS]
    assert text.count("<|im_start|>user\n<tool_response>") == 1
    again = tok.apply_chat_template(_with_string_arguments(CONVERSATION), tools=TOOLS,
                                    tokenize=False, add_generation_prompt=True)
    assert _hermes_arguments(again) == [{"city": "Paris", "days": 3}, ARGS]


def _hermes_arguments(text: str) -> list:
    conversation = text.split("<|im_end|>\n", 1)[1]  # after the system turn
    blocks = conversation.split("<tool_call>\n")[1:]
    return [json.loads(b.split("\n</tool_call>")[0])["arguments"] for b in blocks]


@pytest.mark.parametrize("tool_format", ["xml", "hermes"])
def test_generation_prompt_and_plain_turns(tiny_tokenizer_dir, tool_format):
    tok = _hf_tokenizer(tiny_tokenizer_dir(tool_format))
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    base = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"

    def render(**kw):
        return tok.apply_chat_template(msgs, tokenize=False, **kw)

    assert render() == base
    assert render(add_generation_prompt=True) == base + "<|im_start|>assistant\n<think>\n"
    assert render(add_generation_prompt=True, enable_thinking=True) == \
        base + "<|im_start|>assistant\n<think>\n"
    assert render(add_generation_prompt=True, enable_thinking=False) == \
        base + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    # No system message, tools only: a system turn that only announces the tools.
    text = tok.apply_chat_template(msgs[1:], tools=TOOLS, tokenize=False)
    assert text.startswith("<|im_start|>system\n# Tools\n")
    assert text.endswith("<|im_end|>\n<|im_start|>user\nU<|im_end|>\n")


@pytest.mark.parametrize("tool_format,parser", [("xml", "qwen3_coder"), ("hermes", "json_tools")])
def test_mlx_lm_loads_tokenizer(tiny_tokenizer_dir, tool_format, parser):
    from mlx_lm.utils import load_tokenizer

    path = tiny_tokenizer_dir(tool_format)
    wrapper = load_tokenizer(Path(path))
    hf = _hf_tokenizer(path)
    kw = dict(tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert wrapper.apply_chat_template(CONVERSATION, **kw) == hf.apply_chat_template(
        CONVERSATION, **kw)
    assert wrapper.tool_parser.__module__ == f"mlx_lm.tool_parsers.{parser}"
    assert wrapper.think_start == "<think>" and wrapper.think_end == "</think>"
    assert hf.convert_tokens_to_ids("<|im_end|>") in wrapper.eos_token_ids
    assert type(wrapper.detokenizer).__name__ == "BPEStreamingDetokenizer"


# ------------------------------------------------------------------ checkpoints


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "np") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_layout(tiny_hf_dir, arch):
    path = tiny_hf_dir(arch)
    config = json.loads((path / "config.json").read_text())
    shapes = _safetensors_shapes(path)
    E, H, I = 16, 64, 32  # noqa: E741 - the usual names
    gen = json.loads((path / "generation_config.json").read_text())
    tok = _hf_tokenizer(path)
    assert gen["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    if arch == "qwen3_5_moe":
        assert config["model_type"] == "qwen3_5_moe"
        assert config["architectures"] == ["Qwen3_5MoeForConditionalGeneration"]
        text = config["text_config"]
        assert text["model_type"] == "qwen3_5_moe_text"
        prefix = "model.language_model."
        assert shapes[prefix + "layers.0.mlp.experts.gate_up_proj"] == (E, 2 * I, H)
        assert shapes[prefix + "layers.0.mlp.experts.down_proj"] == (E, H, I)
        assert not any(".experts.0." in k for k in shapes)
        assert {k for k in shapes if not k.startswith(prefix)} == {"lm_head.weight"}
        assert shapes[prefix + "layers.0.linear_attn.in_proj_qkv.weight"] == (128, H)
    else:
        text = config
        assert config["model_type"] == arch
        assert config["num_experts"] == E and "rope_theta" in config
        for e in range(E):
            assert shapes[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"] == (I, H)
            assert shapes[f"model.layers.1.mlp.experts.{e}.up_proj.weight"] == (I, H)
            assert shapes[f"model.layers.1.mlp.experts.{e}.down_proj.weight"] == (H, I)
        assert not any("gate_up_proj" in k for k in shapes)
    assert text["vocab_size"] == len(tok) == shapes["lm_head.weight"][0]
    assert text["num_experts"] == E and text["num_experts_per_tok"] == 4
    if arch != "qwen3_moe":
        assert text["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]
        p = "model.language_model." if arch == "qwen3_5_moe" else "model."
        assert shapes[p + "layers.3.self_attn.q_proj.weight"] == (2 * 4 * 16, H)  # gated q
        assert shapes[p + "layers.0.mlp.shared_expert.gate_proj.weight"] == (I, H)
        assert shapes[p + "layers.0.mlp.shared_expert_gate.weight"] == (1, H)


@pytest.mark.parametrize("arch", ARCHS)
def test_mlx_lm_matches_transformers(tiny_hf_dir, arch):
    import mlx_lm
    import torch
    from transformers import AutoModelForCausalLM

    path = tiny_hf_dir(arch)
    model, tokenizer = mlx_lm.load(str(path))
    assert type(model).__module__ == f"mlx_lm.models.{arch}"
    ref_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": 'Weather in Paris? Reply as {"city": ...}.'}],
        tools=TOOLS, add_generation_prompt=True, enable_thinking=False)
    prompt = list(prompt)[-100:]  # > one 64-token chunk of transformers' GatedDeltaNet
    with torch.no_grad():
        ref = ref_model(torch.tensor([prompt])).logits[0].numpy()
    out = np.array(model(mx.array([prompt]))[0])
    assert out.shape == ref.shape == (len(prompt), len(tokenizer.vocab))
    assert np.abs(out - ref).max() <= 1e-4
    assert ref.std() > 0.5  # logits spread out, so greedy decoding is not degenerate
    assert len(set(ref.argmax(-1).tolist())) > 5


def test_bfloat16_checkpoint_loads(tmp_path):
    import mlx_lm

    path = build_tiny_checkpoint(tmp_path / "bf16", "qwen3_5_moe", dtype="bfloat16",
                                 num_layers=4, num_experts=4, top_k=2)
    shapes_dtypes = {}
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for key in f.keys():
            shapes_dtypes[key] = f.get_slice(key).get_dtype()
    assert set(shapes_dtypes.values()) == {"BF16"}
    model, _ = mlx_lm.load(str(path))
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, 512)


@pytest.mark.parametrize("arch,bits", [("qwen3_5_moe", 2), ("qwen3_5_moe", 4), ("qwen3_5_moe", 8),
                                       ("qwen3_next", 4), ("qwen3_moe", 4)])
def test_quantized_checkpoint(tiny_hf_dir, tiny_quantized_dir, arch, bits):
    import mlx_lm

    path = tiny_quantized_dir(arch, bits=bits, group_size=32)
    config = json.loads((path / "config.json").read_text())
    quant = config["quantization"]
    assert (quant["bits"], quant["group_size"]) == (bits, 32)
    shapes = _safetensors_shapes(path)
    p = "language_model.model.layers.0.mlp." if arch == "qwen3_5_moe" else "model.layers.0.mlp."
    pack = 32 // bits
    assert shapes[p + "switch_mlp.gate_proj.weight"] == (16, 32, 64 // pack)
    assert shapes[p + "switch_mlp.up_proj.scales"] == (16, 32, 64 // 32)
    assert shapes[p + "switch_mlp.down_proj.weight"] == (16, 64, 32 // pack)
    assert not any(".experts." in k for k in shapes)
    assert quant[p + "gate"] == {"group_size": 64, "bits": 8}
    assert shapes[p + "gate.weight"] == (16, 64 // 4)
    if arch != "qwen3_moe":
        assert quant[p + "shared_expert_gate"] == {"group_size": 64, "bits": 8}
    assert (path / "chat_template.jinja").is_file()

    model, tokenizer = mlx_lm.load(str(path))
    ref, _ = mlx_lm.load(str(tiny_hf_dir(arch)))
    ids = mx.array([tokenizer.encode("The small model reads the cache in Paris.")])
    out, expect = model(ids), ref(ids)
    assert bool(mx.all(mx.isfinite(out)))
    err = float(mx.abs(out - expect).mean() / mx.abs(expect).mean())
    assert err < {2: 1.0, 4: 0.4, 8: 0.1}[bits]
