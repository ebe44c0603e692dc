"""Tool calls (flashmoe_backend.tools: calls, grammar, the formats): specs, grammars,
parsing, auto mode."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import mlx.core as mx
import numpy as np
import pytest

from flashmoe_backend.constrained.vocabulary import Vocabulary
from flashmoe_backend.tools.calls import (
    ToolCall,
    detect_tool_format,
    normalize_tool_choice,
    normalize_tools,
    parse_assistant_output,
    parse_tool_calls,
    split_reasoning,
    tool_call_constraint,
    tool_call_grammar,
)
from flashmoe_backend.tools.specs import XML_CLOSERS

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city"],
        },
    },
}
SEARCH = {  # the bare function dict is accepted too
    "name": "search",
    "description": "Search documents.",
    "parameters": {
        "type": "object",
        "properties": {
            "query": {"type": "string", "maxLength": 20},
            "top_k": {"type": "integer", "minimum": 1, "maximum": 20},
            "filters": {"type": "array", "items": {"enum": ["news", "docs", "code"]},
                        "maxItems": 2},
            "exact": {"type": "boolean"},
            "lang": {"type": ["string", "null"], "enum": ["en", "fr", None]},
        },
        "required": ["query", "top_k", "filters"],
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "number", "minimum": -100, "maximum": 100},
                "b": {"type": "number", "minimum": -100, "maximum": 100},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, SEARCH, ADD]
SCHEMAS = {t["function"]["name"] if "function" in t else t["name"]:
           (t["function"] if "function" in t else t)["parameters"] for t in TOOLS}


# ---------------------------------------------------------------------------------------------
# Formats, specs, tool_choice
# ---------------------------------------------------------------------------------------------


def test_detect_tool_format():
    from tests.fixtures.tiny import chat_template

    assert detect_tool_format(chat_template("xml")) == "xml"
    assert detect_tool_format(chat_template("hermes")) == "hermes"
    assert detect_tool_format(None) == "hermes"


@pytest.mark.parametrize(
    "tools,needle",
    [
        ([{"type": "function", "function": {"name": "f", "description": "no params"}}],
         "no 'parameters'"),
        ([{"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "strng"}}}}],
         "malformed"),
        ([{"name": "f", "parameters": {"type": "object", "properties": {}, "required": ["x"]}}],
         "'x'"),
        ([{"name": "f", "parameters": {"type": "array"}}], "type 'object'"),
        ([{"name": "bad name", "parameters": {"type": "object"}}], "names may only"),
        ([{"name": "f", "parameters": {"type": "object"}}] * 2, "duplicate"),
        ([{"type": "retrieval"}], "only 'function'"),
        (["not a dict"], "expected an OpenAI-style"),
        ([{"name": "f", "parameters": {"type": "object", "properties": {
            "n": {"type": "integer", "minimum": 3, "maximum": 1}}}}], "#/properties/n"),
    ],
)
def test_bad_tool_specs_raise(tools, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        normalize_tools(tools)
    with pytest.raises(ValueError):
        tool_call_grammar(tools, "required", "xml")


def test_unenforceable_keyword_is_reported_and_checked_after_generation(tiny_tokenizer_dir):
    """One argument's uniqueItems over objects does not fail the tool list: the grammar leaves
    it out, says so, and the parsed call is checked against it."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tool = {"name": "tag", "parameters": {"type": "object", "required": ["tags"], "properties": {
        "tags": {"type": "array", "uniqueItems": True, "items": {
            "type": "object", "properties": {"k": {"type": "string"}}, "required": ["k"]}}}}}
    [spec] = normalize_tools([tool])
    assert spec.unenforced and "'uniqueItems' at #/properties/tags" in spec.unenforced[0]
    tok = load_tokenizer(tiny_tokenizer_dir("hermes"))
    with pytest.warns(UserWarning, match="uniqueItems"):
        c = tool_call_constraint([tool], "required", "hermes", tok)
    twice = ('<tool_call>\n{"name": "tag", "arguments": {"tags": [{"k": "a"}, {"k": "a"}]}}'
             '\n</tool_call>')
    assert c.status(twice) == "complete"
    _, calls, invalid = parse_tool_calls(twice, "hermes", [tool])
    assert not calls and "non-unique" in invalid[0].error
    assert parse_tool_calls(twice.replace('"a"}]', '"b"}]'), "hermes", [tool])[1]


def test_tool_choice():
    specs = normalize_tools(TOOLS)
    assert normalize_tool_choice(None, specs) == ("auto", None)
    assert normalize_tool_choice(None, []) == ("none", None)
    assert normalize_tool_choice("required", specs) == ("required", None)
    assert normalize_tool_choice("any", specs) == ("required", None)
    assert normalize_tool_choice("search", specs) == ("named", "search")
    assert normalize_tool_choice(
        {"type": "function", "function": {"name": "add"}}, specs) == ("named", "add")
    assert normalize_tool_choice({"type": "tool", "name": "add"}, specs) == ("named", "add")
    with pytest.raises(ValueError, match="unknown tool 'nope'"):
        normalize_tool_choice({"type": "function", "function": {"name": "nope"}}, specs)
    with pytest.raises(ValueError, match="unknown tool"):
        tool_call_grammar(TOOLS, "nope", "hermes")
    with pytest.raises(ValueError):
        normalize_tool_choice("required", [])
    with pytest.raises(ValueError):
        tool_call_grammar(TOOLS, "none", "xml")


def test_raw_xml_string_is_any_text_without_closing_tags(tiny_tokenizer_dir):
    """A raw XML string value is exactly the texts that hold none of the closing tags."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir("xml"))
    note = {"name": "note", "parameters": {"type": "object", "required": ["text"],
                                           "properties": {"text": {"type": "string"}}}}
    c = tool_call_constraint([note], "required", "xml", tok, parallel=False)
    rng = random.Random(0)
    alphabet = list("</parmetfuncioltl_>x\n")
    pieces = ["</parameter>", "</function>", "</tool_call>", "</param", "</tool_cal",
              "<</function", "</p<", "</div>"]
    for _ in range(400):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        if rng.random() < 0.4:
            k = rng.randint(0, len(s))
            s = s[:k] + rng.choice(pieces) + s[k:]
        ok = not any(w in s for w in XML_CLOSERS)
        call = (f"<tool_call>\n<function=note>\n<parameter=text>\n{s}\n</parameter>\n"
                "</function>\n</tool_call>")
        assert (c.status(call) == "complete") == ok, s
        if ok:
            assert c.parse(call)[0].arguments == {"text": s}


# ---------------------------------------------------------------------------------------------
# Parsing recorded model text
# ---------------------------------------------------------------------------------------------

XML_TEXT = (
    "I'll check both.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
    "</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n"
    "<function=search>\n<parameter=query>\nfoo </div> bar\n</parameter>\n<parameter=top_k>\n5\n"
    "</parameter>\n<parameter=filters>\n[\"news\"]\n</parameter>\n<parameter=exact>\nTrue\n"
    "</parameter>\n<parameter=lang>\nnull\n</parameter>\n</function>\n</tool_call>"
)
HERMES_TEXT = (
    "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"O </tool_call>\", "
    "\"unit\": \"celsius\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"add\", \"arguments\": "
    "\"{\\\"a\\\": 1.5, \\\"b\\\": -2}\"}\n</tool_call>"
)


def test_parse_xml_parallel_with_type_conversion():
    content, calls, invalid = parse_tool_calls(XML_TEXT, "xml", TOOLS)
    assert content == "I'll check both."
    assert not invalid
    assert [c.name for c in calls] == ["get_weather", "search"]
    assert calls[0].arguments == {"city": "Paris", "days": 3}
    assert calls[1].arguments == {"query": "foo </div> bar", "top_k": 5, "filters": ["news"],
                                  "exact": True, "lang": None}
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c.id) for c in calls)
    assert len({c.id for c in calls}) == 2
    # Without tools the XML values stay strings.
    _, raw_calls, _ = parse_tool_calls(XML_TEXT)
    assert raw_calls[0].arguments == {"city": "Paris", "days": "3"}
    oa = calls[0].to_openai()
    assert oa["type"] == "function" and json.loads(oa["function"]["arguments"])["days"] == 3


def test_parse_hermes_parallel():
    content, calls, invalid = parse_tool_calls(HERMES_TEXT, "hermes", TOOLS)
    assert content == "" and not invalid
    assert calls[0].arguments == {"city": "O </tool_call>", "unit": "celsius"}
    assert calls[1].name == "add" and calls[1].arguments == {"a": 1.5, "b": -2}
    # The format is only a hint: both are read either way.
    assert [c.name for c in parse_tool_calls(HERMES_TEXT, "xml")[1]] == ["get_weather", "add"]
    assert [c.name for c in parse_tool_calls(XML_TEXT, "hermes")[1]] == ["get_weather", "search"]


def test_parse_leaves_ordinary_text_alone():
    text = "Plain answer with <b>markup</b>, a JSON {\"name\": \"x\"} and a < sign."
    assert parse_tool_calls(text, "xml", TOOLS) == (text, [], [])
    assert parse_tool_calls("  hi  ", "hermes") == ("hi", [], [])


def test_parse_invalid_calls():
    text = (
        "A<tool_call>\n{\"name\": \"nope\", \"arguments\": {}}\n</tool_call>"
        "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1000, \"b\": 1}}\n</tool_call>"
        "<tool_call>\n{not json}\n</tool_call>"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nLima"
    )
    content, calls, invalid = parse_tool_calls(text, "hermes", TOOLS)
    assert content == "A" and "<tool_call>" not in content
    assert calls == []
    errors = [i.error for i in invalid]
    assert "unknown tool 'nope'" in errors[0]
    assert "maximum" in errors[1] or "1000" in errors[1]
    assert "not valid JSON" in errors[2]
    # The unterminated last call lacks its city: invalid, and said to be unterminated.
    assert len(invalid) == 4 and invalid[3].error.startswith("unterminated")
    _, calls2, _ = parse_tool_calls("<tool_call>\n<function=get_weather>\n<parameter=city>\n"
                                    "Lima\n</parameter>\n", "xml", TOOLS)
    assert calls2[0].arguments == {"city": "Lima"}


def test_split_reasoning():
    assert split_reasoning("<think>\nhmm\n</think>\n\nAnswer") == ("hmm", "Answer")
    # Opening <think> was in the prompt.
    assert split_reasoning("hmm, let me see\n</think>\n\nAnswer") == ("hmm, let me see", "Answer")
    assert split_reasoning("still thinking", in_think=True) == ("still thinking", "")
    assert split_reasoning("unclosed <think> thoughts") == ("thoughts", "unclosed")
    assert split_reasoning("plain") == ("", "plain")
    out = parse_assistant_output("plan\n</think>\n\nOk.\n\n" + XML_TEXT.split("\n\n", 1)[1],
                                 "xml", TOOLS)
    assert out.reasoning == "plan" and out.content == "Ok." and len(out.tool_calls) == 2
    assert "<think>" not in out.content and "</think>" not in out.content


@pytest.mark.parametrize("fmt", ["xml", "hermes"])
def test_chat_template_round_trip(fmt, tiny_tokenizer_dir):
    """What the fixtures' chat template renders for a tool-calling turn parses back."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir(fmt))
    calls = [
        {"type": "function", "function": {"name": "get_weather",
                                          "arguments": {"city": "Paris", "days": 2}}},
        {"type": "function", "function": {"name": "search", "arguments": {
            "query": "a b", "top_k": 3, "filters": ["docs", "code"], "exact": False}}},
    ]
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Sure.", "tool_calls": calls}]
    rendered = tok.apply_chat_template(msgs, tools=TOOLS, tokenize=False)
    turn = rendered.rsplit("<|im_start|>assistant\n", 1)[1].split("<|im_end|>")[0]
    content, parsed, invalid = parse_tool_calls(turn, fmt, TOOLS)
    assert content == "Sure." and not invalid
    assert [(c.name, c.arguments) for c in parsed] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in calls]
    # The rendered calls are in the forcing grammar's language, and the reply in auto mode's.
    assert tool_call_constraint(TOOLS, "required", fmt, tok).status(
        turn.split("\n\n", 1)[1]) == "complete"
    assert tool_call_constraint(TOOLS, "required", fmt, tok, mode="auto").status(turn) == "complete"


# ---------------------------------------------------------------------------------------------
# Forced tool calls on the tiny models
# ---------------------------------------------------------------------------------------------

_LOADED: dict = {}


def _model(tiny_quantized_dir, fmt):
    import mlx_lm

    arch = "qwen3_5_moe" if fmt == "xml" else "qwen3_next"
    if arch not in _LOADED:
        _LOADED[arch] = mlx_lm.load(str(tiny_quantized_dir(arch, bits=4)))
    return _LOADED[arch]


def _prompt(tok, tools=False, **kw):
    """The chat prompt; with ``tools=True`` the tool list is rendered in it (~1000 tokens,
    about a second of CPU prefill on the tiny model, so only some tests do)."""
    return tok.apply_chat_template([{"role": "user", "content": "What is the weather?"}],
                                   tools=TOOLS if tools else None, add_generation_prompt=True,
                                   tokenize=False, **kw)


def _run(model, tok, prompt, processors, *, seed=0, max_tokens=300, temp=1.0):
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    mx.random.seed(seed)
    text, finish = "", None
    for r in stream_generate(model, tok, prompt, max_tokens=max_tokens,
                             logits_processors=processors, sampler=make_sampler(temp=temp)):
        text += r.text
        finish = r.finish_reason
    return text, finish


@pytest.mark.parametrize("fmt", ["xml", "hermes"])
@pytest.mark.parametrize("choice", ["required", "get_weather", "search", "add"])
def test_forced_tool_calls_validate(fmt, choice, tiny_quantized_dir):
    model, tok = _model(tiny_quantized_dir, fmt)
    assert detect_tool_format(tok.chat_template) == fmt
    constraint = tool_call_constraint(TOOLS, choice, fmt, tok, parallel=False)
    prompt = _prompt(tok, tools=choice == "required", enable_thinking=False)
    for seed in range(2):
        proc = constraint.logits_processor(300)
        text, finish = _run(model, tok, prompt, [proc], seed=seed)
        assert proc.is_complete, (finish, text)
        calls = constraint.parse(text)
        content, calls2, invalid = parse_tool_calls(text, fmt, TOOLS)
        assert content == "" and not invalid and len(calls) == len(calls2) == 1, text
        call = calls[0]
        if choice != "required":
            assert call.name == choice
        jsonschema.validate(call.arguments, SCHEMAS[call.name])


@pytest.mark.parametrize("fmt", ["xml", "hermes"])
def test_forced_parallel_tool_calls(fmt, tiny_quantized_dir):
    model, tok = _model(tiny_quantized_dir, fmt)
    constraint = tool_call_constraint(TOOLS, "add", fmt, tok, parallel=True)
    prompt = _prompt(tok, enable_thinking=False)
    counts = []
    for seed in range(3):
        proc = constraint.logits_processor()
        text, finish = _run(model, tok, prompt, [proc], seed=seed, max_tokens=250)
        if finish == "length":  # many calls: reported as incomplete, never as valid
            assert not proc.is_complete
            continue
        assert proc.is_complete
        calls = constraint.parse(text)
        for c in calls:
            jsonschema.validate(c.arguments, SCHEMAS["add"])
        counts.append(len(calls))
    assert counts, "every run hit max_tokens"
    # The grammar allows a second call after the first (checked on the index itself).
    one = ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
           if fmt == "hermes" else
           "<tool_call>\n<function=add>\n<parameter=a>\n1\n</parameter>\n<parameter=b>\n2\n"
           "</parameter>\n</function>\n</tool_call>")
    assert constraint.status(one) == "complete"
    assert constraint.status(one + "\n" + one) == "complete"
    assert constraint.status(one + "\n" + one[:20]) == "incomplete"


def test_forced_with_reasoning_prefix(tiny_quantized_dir):
    model, tok = _model(tiny_quantized_dir, "xml")
    c = tool_call_constraint(TOOLS, "get_weather", "xml", tok, parallel=False,
                             reasoning_prefix=True)
    call = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nLima\n</parameter>\n"
            "</function>\n</tool_call>")
    assert c.status("let me think\n</think>\n\n" + call) == "complete"
    assert c.status(call) == "incomplete"  # still reasoning: the block must be closed first
    assert c.status("thinking <tool_call> here\n</think>\n\n" + call) == "complete"


# ---------------------------------------------------------------------------------------------
# Auto mode
# ---------------------------------------------------------------------------------------------


class Force:
    """Test helper: forces a token sequence at the first decode steps, then lets go."""

    def __init__(self, ids):
        self.ids = list(ids)
        self.n0 = None

    def __call__(self, tokens, logits):
        if self.n0 is None:
            self.n0 = tokens.shape[0]
        k = tokens.shape[0] - self.n0
        if k >= len(self.ids):
            return logits
        only = np.zeros(logits.shape[-1], dtype=bool)
        only[self.ids[k]] = True
        # A select, not an addition: a tiny random model's NaN logits (seen on CUDA) must not
        # survive the forcing.
        return mx.where(mx.array(only), mx.zeros_like(logits), mx.array(-np.inf, logits.dtype))


def _auto(tok, fmt, **kw):
    return tool_call_constraint(TOOLS, "required", fmt, tok, mode="auto", **kw)


def test_auto_mode_lets_free_text_through(tiny_quantized_dir):
    model, tok = _model(tiny_quantized_dir, "xml")
    proc = _auto(tok, "xml").logits_processor()
    vocab = proc.vocabulary
    prompt = mx.array(tok.encode(_prompt(tok, enable_thinking=False)))
    logits = mx.random.normal((1, 512))
    ids = tok.encode("Hello there, no tools needed. <b>x</b> </parameter>", add_special_tokens=False)
    out = proc(prompt, logits)
    for i in range(1, len(ids) + 1):
        allowed = set(np.nonzero(np.isfinite(np.array(out[0])))[0].tolist())
        assert ids[i - 1] in allowed and vocab.eos_token_id in allowed  # text may end anywhere
        out = proc(mx.concatenate([prompt, mx.array(ids[:i])]), logits)
    assert proc.is_complete
    # Free text allows every token that is text (valid UTF-8 on its own, not special).
    allowed = np.isfinite(np.array(out[0]))
    for tid, b in enumerate(vocab.token_bytes):
        if tid not in vocab.special_ids and b.decode("utf-8", "ignore").encode() == b:
            assert allowed[tid], b


@pytest.mark.parametrize("fmt", ["xml", "hermes"])
@pytest.mark.parametrize("split", [False, True])
def test_auto_mode_switches_to_grammar(fmt, split, tiny_quantized_dir):
    model, tok = _model(tiny_quantized_dir, fmt)
    vocab = Vocabulary.from_tokenizer(tok)
    lead = tok.encode("Let me check.\n\n", add_special_tokens=False)
    if split:  # "<tool_call>" spelled with single-byte tokens
        opener = [vocab.byte_token_ids[b] for b in b"<tool_call>"]
    else:
        opener = [tok._tokenizer.convert_tokens_to_ids("<tool_call>")]
        assert len(opener) == 1 and vocab.token_bytes[opener[0]] == b"<tool_call>"
    prompt = _prompt(tok, enable_thinking=False)
    c = _auto(tok, fmt, parallel=False)
    for seed in range(2):
        proc = c.logits_processor(300)
        text, finish = _run(model, tok, prompt, [Force(lead + opener), proc], seed=seed)
        assert finish == "stop" and proc.is_complete, text
        content, calls, invalid = parse_tool_calls(text, fmt, TOOLS)
        assert content == "Let me check." and not invalid and len(calls) == 1, text
        jsonschema.validate(calls[0].arguments, SCHEMAS[calls[0].name])
    # Once the opener is written, only the calls' grammar is allowed.
    proc = c.logits_processor()
    assert proc.advance_text("Let me check. <tool_call>")
    assert not proc.is_complete and not proc.advance_text("plain text again")


def test_auto_mode_ignores_tool_call_inside_think(tiny_quantized_dir):
    model, tok = _model(tiny_quantized_dir, "xml")
    prompt = _prompt(tok)  # thinking on: the prompt ends inside <think>
    assert prompt.endswith("<think>\n")
    tc = tok._tokenizer.convert_tokens_to_ids("<tool_call>")
    think_end = tok._tokenizer.convert_tokens_to_ids("</think>")
    words = tok.encode("maybe ", add_special_tokens=False)
    c = _auto(tok, "xml", parallel=False, reasoning_prefix=True)
    proc = c.logits_processor(300)
    forced = words + [tc] + words + [think_end] + tok.encode("\n\n", add_special_tokens=False)
    text, finish = _run(model, tok, prompt, [Force(forced + [tc]), proc], seed=1)
    assert finish == "stop" and proc.is_complete, text
    out = parse_assistant_output(text, "xml", TOOLS, in_think=True)
    assert out.reasoning.startswith("maybe") and "<tool_call>" in out.reasoning
    assert len(out.tool_calls) == 1 and not out.invalid_tool_calls
    assert out.content == ""
    # Inside <think>, "<tool_call>" is just text; a reply may also end while reasoning.
    p2 = c.logits_processor()
    assert p2.advance_text("maybe <tool_call> free words") and p2.is_complete


def test_tool_call_dataclass():
    c = ToolCall("f", {"x": 1})
    assert c.id.startswith("call_") and ToolCall("f", {}).id != c.id


def _one_param(schema: dict) -> dict:
    return {"name": "t", "parameters": {"type": "object", "properties": {"v": schema},
                                        "required": ["v"]}}


def _xml_call(value: str) -> str:
    return f"<tool_call>\n<function=t>\n<parameter=v>\n{value}\n</parameter>\n</function>\n</tool_call>"


@pytest.mark.parametrize("schema,good,bad", [
    ({"type": "string", "maxLength": 255}, "x" * 255, "x" * 256),  # long bounds compile and mask
    ({"type": "string", "format": "email", "maxLength": 12}, "al@ex.com", "averyverylong@example.com"),
    ({"type": "string", "pattern": "^[a-z]+$", "maxLength": 5}, "abcde", "abcdef"),
    ({"type": "string", "pattern": "^[a-z]+$", "minLength": 3}, "abc", "ab"),
])
def test_xml_raw_strings_keep_every_bound(schema, good, bad, tiny_tokenizer_dir):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    c = tool_call_constraint([_one_param(schema)], "required", "xml",
                             load_tokenizer(tiny_tokenizer_dir("xml")), parallel=False)
    assert c.status(_xml_call(good)) == "complete" and c.status(_xml_call(bad)) != "complete"
    proc = c.logits_processor()
    assert proc.advance_text("<tool_call>\n<function=t>\n<parameter=v>\n")
    assert proc.allowed_token_ids()  # the mask inside the value can be computed


@pytest.mark.parametrize("fmt", ["xml", "hermes"])
@pytest.mark.parametrize("schema", [{"type": "integer"}, {"type": "string", "format": "email"},
                                    {"type": "string", "pattern": "^v[0-9]+$"}])
def test_steering_closes_against_a_model_that_wants_more(fmt, schema, tiny_tokenizer_dir):
    """A model that always prefers another digit still ends with a complete call at max_tokens:
    the processor follows the way to finish it committed to."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    c = tool_call_constraint([_one_param(schema)], "required", fmt,
                             load_tokenizer(tiny_tokenizer_dir(fmt)), parallel=False)
    vocab = c.vocabulary
    digits = [i for i, b in enumerate(vocab.token_bytes) if b.isdigit() and not b.startswith(b"0")]
    bias = np.zeros((1, vocab.size), np.float32)
    bias[0, digits] = 10.0 + np.arange(len(digits)) * 0.01
    proc = c.logits_processor(max_tokens=64)
    ids = [vocab.eos_token_id]  # stands for the prompt
    for _ in range(64):
        ids.append(int(mx.argmax(proc(mx.array(ids), mx.array(bias)), axis=-1).item()))
        if ids[-1] in vocab.eos_token_ids:
            break
    if ids[-1] not in vocab.eos_token_ids:
        proc(mx.array(ids), mx.array(bias))  # take in the last token
    assert proc.is_complete, vocab.decode_bytes(ids[1:])
    text = vocab.decode_bytes([t for t in ids[1:] if t not in vocab.eos_token_ids]).decode()
    assert c.parse(text)[0].name == "t"


@pytest.mark.parametrize("schema,written", [
    # digits loop in [0-9]+ until the unit: the way out takes the unit, not 40 more digits
    ({"type": "string", "pattern": "^([0-9]+[wdhm])( [0-9]+[wdhm]){0,3}$"}, "1" * 30),
    # a closing ] leaves the same choice (, or ]) once: still the way out, not a new item
    ({"type": "array", "items": {"type": "array", "items": {"anyOf": [
        {"type": "string", "maxLength": 500}, {"type": "number"}, {"type": "null"}]}}},
     '[["package is delivered", 1000000'),
])
def test_finishing_walk_leaves_loops(schema, written, tiny_tokenizer_dir):
    """The way to finish (what steering holds a model to near max_tokens) is short from inside
    a loop: from the bench's two tools that did not fit in 256 tokens (pm_log_work's
    ``time_spent``, sheet_append_rows' ``rows``)."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    c = tool_call_constraint([_one_param(schema)], "required", "xml",
                             load_tokenizer(tiny_tokenizer_dir("xml")), parallel=False)
    proc = c.logits_processor()
    head = "<tool_call>\n<function=t>\n<parameter=v>\n" + written
    assert proc.advance_text(head)
    path = proc.finishing_path(24)
    assert path is not None
    text = head + c.vocabulary.decode_bytes(path).decode()
    assert c.status(text) == "complete", text


def test_steering_stops_a_comma_that_cannot_be_finished(tiny_tokenizer_dir):
    """A model that always wants another array item is held to the way out at the comma that
    would commit to an item with no room left to write it, although the way out from before
    the comma is short (steering used to wait for that short way to fill the tokens left)."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    item = {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{100}$"}},
            "required": ["sku"]}
    c = tool_call_constraint([_one_param({"type": "array", "items": item})], "required", "xml",
                             load_tokenizer(tiny_tokenizer_dir("xml")), parallel=False)
    vocab = c.vocabulary
    bias = np.zeros((1, vocab.size), np.float32)
    for i, b in enumerate(vocab.token_bytes):
        if b.strip() in (b",", b"{", b"[") or b.startswith(b'"sku'):
            bias[0, i] = 20.0  # another item, always
        elif b.isalnum():
            bias[0, i] = 5.0

    def run(max_tokens):
        proc = c.logits_processor(max_tokens=max_tokens)
        ids = [vocab.eos_token_id]  # stands for the prompt
        for _ in range(max_tokens or 400):
            ids.append(int(mx.argmax(proc(mx.array(ids), mx.array(bias)), axis=-1).item()))
            if ids[-1] in vocab.eos_token_ids:
                break
        if ids[-1] not in vocab.eos_token_ids:
            proc(mx.array(ids), mx.array(bias))  # take in the last token
        out = [vocab.token_bytes[t] for t in ids[1:] if t not in vocab.eos_token_ids]
        return proc, out

    # Free, the model writes items forever: where does its first item end, and how long is one?
    _, free = run(None)
    ends = [i for i, b in enumerate(free) if b"}" in b][:2]
    first_end, item_tokens = ends[0], ends[1] - ends[0]
    # Room after the first item for the way out and steering's margin, not for another item.
    probe = c.logits_processor()
    assert probe.advance_text(b"".join(free[: first_end + 1]))
    way_out = len(probe.finishing_path(200))
    room = item_tokens - 4
    assert way_out + 16 < room < item_tokens + way_out, (way_out, item_tokens)
    proc, out = run(first_end + 1 + room)
    text = b"".join(out).decode()
    assert proc.is_complete, text
    assert text.count('"sku"') == 1 and c.parse(text)[0].name == "t"


@pytest.mark.parametrize("value", ['["a", "b"]', '["a</parameter>b"]', '["x</tool_call>y"]'])
def test_closing_tags_inside_a_json_value_parse_back(value, tiny_tokenizer_dir):
    """A JSON-valued XML parameter may hold a closing tag inside a string (the grammar allows
    it); the parser reads the value as JSON, not up to the tag."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tool = _one_param({"type": "array", "items": {"type": "string"}})
    c = tool_call_constraint([tool], "required", "xml", load_tokenizer(tiny_tokenizer_dir("xml")))
    assert c.status(_xml_call(value)) == "complete"
    content, calls, invalid = parse_tool_calls("ok " + _xml_call(value), "xml", [tool])
    assert content == "ok" and not invalid and calls[0].arguments == {"v": json.loads(value)}


def test_tool_specs_are_checked_once_per_distinct_tool():
    """Agents resend the same tools with every request: the checked spec is reused."""
    [a], [b] = normalize_tools([SEARCH]), normalize_tools([json.loads(json.dumps(SEARCH))])
    assert a is b
    [c] = normalize_tools([{**SEARCH, "description": "Another."}])
    assert c is not a and c.description == "Another."


# ---------------------------------------------------------------------------------------------
# uniqueItems, enforced while decoding
# ---------------------------------------------------------------------------------------------

_UNIQUE_CASES = [
    {"type": "string", "maxLength": 8},  # a repeat of a string at its maxLength is a dead end
    {"type": "string", "format": "email"},
    {"type": "string", "pattern": "^[a-z]{1,3}$"},
    {"enum": ["a", "b", "c"]},  # every value used: the array must close
    {"type": "integer", "minimum": 1, "maximum": 4},
    {"type": "integer", "minimum": 1, "maximum": 70},
    {"type": "boolean"},
]


def _repeating_model(vocab: Vocabulary) -> np.ndarray:
    """Logits of a model that wants to write the same item over and over: ``"a"``, ``1``,
    ``true``, commas."""
    bias = np.zeros((1, vocab.size), np.float32)
    for rank, piece in enumerate([b'"a"', b'"a', b"a", b'"', b"1", b"true", b",", b", ",
                                  b"user@x.io"]):
        bias[0, [i for i, b in enumerate(vocab.token_bytes) if b == piece]] = 20.0 - rank
    return bias


def _drive(c, bias: np.ndarray, max_tokens: int = 160) -> str:
    vocab = c.vocabulary
    proc = c.logits_processor(max_tokens=max_tokens)
    ids = [vocab.eos_token_id]  # stands for the prompt
    for _ in range(max_tokens):
        ids.append(int(mx.argmax(proc(mx.array(ids), mx.array(bias)), axis=-1).item()))
        if ids[-1] in vocab.eos_token_ids:
            break
    else:
        proc(mx.array(ids), mx.array(bias))  # take in the last token
    assert proc.is_complete, vocab.decode_bytes(ids[1:])
    return vocab.decode_bytes([t for t in ids[1:] if t not in vocab.eos_token_ids]).decode()


@pytest.mark.parametrize("fmt", ["xml", "hermes"])
@pytest.mark.parametrize("items", _UNIQUE_CASES, ids=json.dumps)
def test_unique_items_hold_against_a_model_that_repeats(fmt, items, tiny_tokenizer_dir):
    """uniqueItems over scalars is enforced while decoding (no longer named as unenforced): a
    model that keeps writing the same item gets a valid call, with the array closing once
    a finite set of values is used up."""
    import warnings

    from mlx_lm.tokenizer_utils import load as load_tokenizer

    schema = {"type": "array", "items": items, "uniqueItems": True, "minItems": 2, "maxItems": 6}
    if items.get("type") == "boolean":
        schema["minItems"] = 1
    tool = _one_param(schema)
    assert normalize_tools([tool])[0].unenforced == ()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not enforced" warning
        c = tool_call_constraint([tool], "required", fmt,
                                 load_tokenizer(tiny_tokenizer_dir(fmt)), parallel=False)
    assert c.guard is not None
    text = _drive(c, _repeating_model(c.vocabulary))
    _, calls, invalid = parse_tool_calls(text, fmt, [tool])
    assert not invalid and len(calls) == 1, text
    jsonschema.validate(calls[0].arguments, tool["parameters"])


def test_unique_items_nested_in_objects_and_nullable(tiny_tokenizer_dir):
    """The guard follows the schema into nested objects, $refs and Optional (anyOf null)."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    params = {"type": "object", "required": ["filter"], "$defs": {"Tags": {
        "type": "array", "items": {"enum": ["x", "y"]}, "uniqueItems": True, "minItems": 2}},
        "properties": {"filter": {"type": "object", "required": ["tags", "ids"], "properties": {
            "tags": {"$ref": "#/$defs/Tags"},
            "ids": {"anyOf": [{"type": "array", "items": {"type": "integer", "minimum": 0},
                               "uniqueItems": True, "minItems": 3}, {"type": "null"}]}}}}}
    tool = {"name": "t", "parameters": params}
    c = tool_call_constraint([tool], "required", "hermes",
                             load_tokenizer(tiny_tokenizer_dir("hermes")), parallel=False)
    text = _drive(c, _repeating_model(c.vocabulary))
    _, calls, invalid = parse_tool_calls(text, "hermes", [tool])
    assert not invalid and len(calls) == 1, text
    jsonschema.validate(calls[0].arguments, params)


@pytest.mark.parametrize("value,repeated", [
    ('["a", "\\u0061"]', True), ("[1, 1.0]", True), ("[1, 10]", False), ('["a", "a "]', False),
    ('[true, false, true]', True), ('[[1], [1]]', False),  # arrays of arrays: checked later
])
def test_json_cursor_compares_items_by_value(value, repeated):
    from flashmoe_backend.constrained.unique_items import JsonCursor

    items = {"type": "array"} if value.startswith("[[") else {
        "type": ["string", "number", "boolean"]}
    cursor = JsonCursor({"type": "array", "items": items, "uniqueItems": True}, {})
    assert cursor.feed(value.encode()) is not repeated
    assert cursor.repeated is repeated
