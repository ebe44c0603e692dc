"""The demo model's training code (train/): synthetic data, tokenizer, a tiny training run."""

from __future__ import annotations

import json

import pytest

from flashmoe_backend.tools.calls import parse_tool_calls
from flashmoe_backend.tools.specs import normalize_tools
from train import data


@pytest.fixture(scope="module")
def render_tok():
    from train.tokenizer import render_tokenizer

    return render_tokenizer()


@pytest.fixture(scope="module")
def demo_tok(tmp_path_factory, render_tok):
    """A small trained tokenizer of train/tokenizer.py (isolated spaces, 640 tokens)."""
    from transformers import AutoTokenizer

    from train.tokenizer import build_tokenizer

    corpus = list(data.corpus_texts(render_tok, 5, 120))
    out = build_tokenizer(tmp_path_factory.mktemp("demo-tok"), vocab_size=640, corpus=corpus)
    return AutoTokenizer.from_pretrained(str(out))


def _dump(ex: data.Example) -> str:
    return json.dumps([ex.kind, ex.messages, ex.tools, ex.train_turns, ex.meta], sort_keys=True)


def test_generator_is_deterministic_by_seed():
    a = [_dump(e) for e in data.examples(7, 40)]
    assert a == [_dump(e) for e in data.examples(7, 40)]
    assert a[10:] == [_dump(e) for e in data.examples(7, 30, start=10)]  # index-addressable
    b = [_dump(e) for e in data.examples(8, 40)]
    assert sum(x != y for x, y in zip(a, b, strict=False)) >= 38
    kinds = {e.kind for e in data.examples(7, 200)}
    assert kinds == set(data.KINDS)


@pytest.mark.parametrize("kind", data.KINDS)
def test_render_marks_assistant_spans(render_tok, kind):
    for ex in data.examples(3, 12, kind=kind):
        seqs = data.render(render_tok, ex)
        assert len(seqs) == len(ex.train_turns) >= 1
        for turn, segments in zip(ex.train_turns, seqs, strict=False):
            (prompt, p_trained), (target, t_trained) = segments
            assert (p_trained, t_trained) == (False, True)
            # the prompt is exactly what inference renders (enable_thinking=False)
            assert prompt == render_tok.apply_chat_template(
                ex.messages[:turn], tools=ex.tools, add_generation_prompt=True, enable_thinking=False,
                tokenize=False)
            assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
            assert target.endswith("<|im_end|>") and "<|im_start|>" not in target
            # the history rendering of the whole turn holds the same assistant text
            full = render_tok.apply_chat_template(ex.messages[: turn + 1], tools=ex.tools, tokenize=False)
            assert full.endswith("<|im_start|>assistant\n" + target + "\n")
        for ids, mask in data.encode(render_tok, ex):
            assert len(ids) == len(mask) and 0 < sum(mask) < len(mask)
            first = mask.index(1)
            assert all(mask[first:]) and not any(mask[:first])  # one trained span, at the end
            trained = render_tok.decode([t for t, m in zip(ids, mask, strict=False) if m])
            assert trained.endswith("<|im_end|>")


def test_qa_answers_are_spans_of_the_context():
    kinds = {}
    for ex in data.examples(11, 300, kind="qa"):
        ctx, answer, qtype = ex.meta["context"], ex.meta["answer"], ex.meta["type"]
        kinds[qtype] = kinds.get(qtype, 0) + 1
        assert ex.messages[-1] == {"role": "assistant", "content": answer}
        if qtype == "span":
            assert answer in ctx
        elif qtype == "compound":
            first, second = answer.split(", on ")
            assert first in ctx and second in ctx
        else:
            assert answer == data.NO_ANSWER
    assert kinds["span"] > 200 and kinds.get("compound", 0) > 5 and kinds.get("unanswerable", 0) > 3
    # entities are combinatorial: almost every answer is new
    answers = [e.meta["answer"] for e in data.examples(12, 300, kind="qa") if e.meta["type"] == "span"]
    assert len(set(answers)) > 0.8 * len(answers)


def test_tool_call_examples_parse(render_tok):
    n_calls = 0
    for ex in data.examples(13, 80, kind="tool"):
        names = [t["function"]["name"] for t in ex.tools]
        assert len(set(names)) == len(names)
        if not ex.meta["calls"]:
            assert ex.messages[-1]["role"] == "assistant" and "tool_calls" not in ex.messages[-1]
            continue
        prompt, target = data.turn_text(render_tok, ex, ex.train_turns[0])
        parsed = data.parse_xml_tool_calls(target)
        assert len(parsed) == len(ex.meta["calls"])
        for got, want in zip(parsed, ex.meta["calls"], strict=False):
            assert got["name"] == want["name"] and got["name"] in names
            assert data.args_match(got["arguments"], want["arguments"])
            spec = ex.tools[names.index(got["name"])]["function"]["parameters"]
            assert set(spec["required"]) <= set(got["arguments"]) <= set(spec["properties"])
            for k, v in got["arguments"].items():
                t = spec["properties"][k]["type"]
                assert {"string": str, "integer": int, "number": (int, float), "boolean": bool}[t] \
                    is type(v) or isinstance(v, {"number": (int, float)}.get(t, type(v)))
                if "enum" in spec["properties"][k]:
                    assert v in spec["properties"][k]["enum"]
            n_calls += 1
        # the tool results and the final answer follow
        assert ex.messages[-2]["role"] == "tool" and ex.messages[-1]["role"] == "assistant"
    assert n_calls > 60


def test_tool_calls_parse_with_the_engine_parser(render_tok):
    for ex in data.examples(14, 30, kind="tool"):
        if not ex.meta["calls"]:
            continue
        _, target = data.turn_text(render_tok, ex, ex.train_turns[0])
        specs = normalize_tools(ex.tools)
        assert [s.to_openai() for s in specs] == ex.tools  # the engine renders the same prompt
        content, calls, invalid = parse_tool_calls(target.removesuffix("<|im_end|>"), "xml", ex.tools)
        assert not content.strip() and not invalid
        got = [{"name": c.name, "arguments": c.arguments} for c in calls]
        assert [g["name"] for g in got] == [w["name"] for w in ex.meta["calls"]]
        for g, w in zip(got, ex.meta["calls"], strict=False):
            assert data.args_match(g["arguments"], w["arguments"])


def test_json_examples_copy_the_passage():
    for ex in data.examples(15, 100, kind="json"):
        answer = json.loads(ex.messages[-1]["content"])
        assert answer == ex.meta["object"]
        assert list(answer) == list(ex.meta["schema"]["properties"])
        for v in answer.values():
            if isinstance(v, str):
                assert v in ex.meta["passage"]
            elif isinstance(v, int) and not isinstance(v, bool):
                assert str(v) in ex.meta["passage"]


def test_tokenizer_copies_words_with_the_same_ids(demo_tok):
    for word in ["Bucauk", "Frorprithess Nagraniex", "#536684", "Rua Augusta 12"]:
        alone = demo_tok.encode(word, add_special_tokens=False)
        inside = demo_tok.encode("lives in " + word + ".", add_special_tokens=False)
        assert any(inside[i: i + len(alone)] == alone for i in range(len(inside)))
    text = "<|im_start|>user\nHi<|im_end|>\n<tool_call>\n<function=f>"
    ids = demo_tok.encode(text, add_special_tokens=False)
    assert demo_tok.decode(ids) == text
    for t in ("<|im_start|>", "<|im_end|>", "<tool_call>", "<think>"):
        assert t in demo_tok.get_vocab()
    assert demo_tok.eos_token == "<|im_end|>"


def test_trained_tokenizer_is_what_a_checkpoint_loader_builds(demo_tok, render_tok, tmp_path):
    # AutoTokenizer builds a qwen3_5_moe checkpoint's tokenizer with Qwen3.5's own pre-tokenizer:
    # the trained one must tokenize exactly like it (runs 1-5 of the demo model did not).
    from transformers import AutoTokenizer

    from train.tokenizer import use_qwen_pipeline

    demo_tok.save_pretrained(str(tmp_path))
    use_qwen_pipeline(tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert type(loaded).__name__ == "Qwen3_5Tokenizer"
    texts = list(data.corpus_texts(render_tok, 11, 20))
    assert any(ch.isdigit() for t in texts for ch in t)
    for text in texts:
        assert loaded(text)["input_ids"] == demo_tok(text)["input_ids"]


def test_tiny_training_run_learns_and_saves_a_loadable_checkpoint(tmp_path):
    pytest.importorskip("torch")
    from train.train import main

    out = tmp_path / "hf"
    log = main(["--out", str(out), "--tiny", "--minutes", "3", "--steps", "10", "--warmup", "3",
                "--save-dtype", "float32"])
    assert log["steps"] == 10
    before = sum(log["initial_eval"].values()) / len(log["initial_eval"])
    after = sum(log["final_eval"].values()) / len(log["final_eval"])
    assert after < before - 0.5, (before, after)
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and "model.safetensors" in files and "train_log.json" in files
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3_5_moe" and "text_config" in config
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "np") as f:
        keys = list(f.keys())
    assert "model.language_model.layers.0.mlp.experts.gate_up_proj" in keys
    assert "model.language_model.layers.3.self_attn.q_proj.weight" in keys
    assert "model.language_model.layers.0.linear_attn.in_proj_qkv.weight" in keys

    # the saved checkpoint loads back into transformers' model: training continues from it
    log2 = main(["--out", str(tmp_path / "hf2"), "--tiny", "--init", str(out), "--minutes", "3",
                 "--steps", "1", "--seed", "1"])
    for kind, loss in log["final_eval"].items():
        assert log2["initial_eval"][kind] == pytest.approx(loss, abs=1e-3)

    # grown by four layers, it starts as the same function (the new layers are the identity)
    log3 = main(["--out", str(tmp_path / "hf3"), "--tiny", "--init", str(out), "--grow-layers", "4",
                 "--minutes", "3", "--steps", "1", "--seed", "1"])
    assert log3["shape"]["num_layers"] == 8
    for kind, loss in log["final_eval"].items():
        assert log3["initial_eval"][kind] == pytest.approx(loss, abs=1e-3)

    import mlx_lm

    model, tok = mlx_lm.load(str(out))
    text = mlx_lm.generate(model, tok, "<|im_start|>user\nHi<|im_end|>\n", max_tokens=4)
    assert isinstance(text, str)

    from flashmoe_backend import FlashMoE, PackOptions, pack

    store = tmp_path / "store"
    pack(out, store, PackOptions(bits=4, group_size=32, progress=False))
    engine = FlashMoE.load(store, cache_gb=0.01)
    try:
        result = engine.generate([{"role": "user", "content": "Hi!"}], max_tokens=4, enable_thinking=False)
        assert result.stats.generated_tokens >= 1
    finally:
        engine.close()


def test_grow_layers_copies_the_last_layers_with_zero_outputs():
    torch = pytest.importorskip("torch", reason="train/train.py needs torch (the dev extra installs it)")
    from train.train import grow_layers

    state = {f"model.layers.{i}.{name}": torch.full((2,), float(i + 1))
             for i in range(4) for name in ("self_attn.q_proj.weight", "self_attn.o_proj.weight")}
    grown = grow_layers(state, layers=4, added=4, interval=4)
    new, last = "model.layers.7.self_attn.", "model.layers.3.self_attn."
    assert torch.equal(grown[new + "q_proj.weight"], state[last + "q_proj.weight"])
    assert not grown[new + "o_proj.weight"].any()
    assert torch.equal(grown[last + "o_proj.weight"], state[last + "o_proj.weight"])
    with pytest.raises(ValueError, match="multiple of the attention interval"):
        grow_layers(state, layers=4, added=2, interval=4)


def test_parse_mix():
    import argparse

    pytest.importorskip("torch", reason="train/train.py needs torch (the dev extra installs it)")
    from train.train import parse_mix

    assert parse_mix("qa=0.45,tool=0.35,json=0.12,chat=0.08") == {
        "qa": 0.45, "tool": 0.35, "json": 0.12, "chat": 0.08}
    with pytest.raises(argparse.ArgumentTypeError, match="'poems=1'"):
        parse_mix("qa=1,poems=1")
    assert data.example(5, 0, mix={"json": 1.0}).kind == "json"


def test_evaluation_keeps_every_failure():
    from train.evaluate import Cell

    cell = Cell()
    for i in range(6):
        cell.add(10.0, {"i": i}, exact=i % 2 == 0)  # odd i fail
    kept = [(e["i"], e["failed"]) for e in cell.examples]
    assert kept == [(0, False), (1, True), (2, False), (3, True), (5, True)]
