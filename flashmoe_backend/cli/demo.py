"""``flashmoe demo``: the embedded default model, a small trained Qwen3.5-MoE shipped in the package.

The model (transformers' Qwen3.5-MoE layer pattern: 8 layers, 6 GatedDeltaNet + 2 gated attention,
32 experts top-4 plus a shared expert, 7.75M parameters) was trained by ``train/train.py`` on a
synthetic chat corpus: grounded QA, Qwen3.5 XML tool calls, JSON extraction, short replies. Its
4-bit store (float32 resident weights: MLX's CPU is slow at float16) lives in ``assets/``. It gets
the formats right and is only fair at copying long numbers: bench/RESULTS.md has its evaluation.
"""

from __future__ import annotations

import json
import sys

DEMO_IS_TRAINED = True

DOCUMENT = """HR record: Lena Okafor
Lena Okafor works as a pharmacist.
Lena Okafor is based in Lisbon.
The Lisbon office moves to Rua Augusta on 3 March 2027."""
QUESTION = "What does Lena do for a living?"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city name"},
                "unit": {
                    "type": "string",
                    "enum": ["celsius", "fahrenheit"],
                    "description": "Temperature unit",
                },
            },
            "required": ["city"],
        },
    },
}
REQUEST = "Can you check the weather in Lisbon?"


def fake_weather(city: str, unit: str = "celsius") -> dict:
    """The demo's tool: a canned answer, so that the demo stays offline (the fields of the
    weather results the demo model was trained on)."""
    return {"temperature": 21 if unit == "celsius" else 70, "condition": "sunny", "humidity": 40}


def run_demo(cache_gb: float | None = None, max_tokens: int = 48) -> int:
    """Answer a question from a document, then call a tool and answer from its result, streaming
    the experts with a cache of a quarter of their bytes; print the statistics."""
    from flashmoe_backend.cli.console import print_stats, stream_to_console
    from flashmoe_backend.engine import GB, FlashMoE
    from flashmoe_backend.store.format import read_manifest
    from flashmoe_backend.store.source import default_store

    store = default_store()
    expert_bytes = read_manifest(store).expert_bytes
    budget = cache_gb if cache_gb is not None else expert_bytes / 4 / GB
    engine = FlashMoE.load(store, cache_gb=budget)
    err = sys.stderr
    print(
        f"flashmoe demo: {store.name}, a 7.75M-parameter trained Qwen3.5-MoE; "
        f"{expert_bytes / 2**20:.1f} MiB of experts streamed through a "
        f"{budget * GB / 2**20:.2f} MiB cache ({budget * GB / expert_bytes:.0%})\n",
        file=err,
    )
    try:
        messages = [
            {"role": "system", "content": "Use the following facts to answer.\n" + DOCUMENT},
            {"role": "user", "content": QUESTION},
        ]
        print(f"Document:\n{DOCUMENT}\n\nQ: {QUESTION}\nA: ", end="", file=err, flush=True)
        stream_to_console(engine.stream(messages, max_tokens=max_tokens, enable_thinking=False))

        messages = [{"role": "user", "content": REQUEST}]
        print(f"\nQ: {REQUEST}", file=err)
        call = engine.generate(
            messages,
            tools=[WEATHER_TOOL],
            tool_choice="required",
            max_tokens=max_tokens,
            enable_thinking=False,
        ).tool_calls[0]
        result = fake_weather(**call.arguments)
        print(
            f"tool call: {call.name}({json.dumps(call.arguments)}) -> {json.dumps(result)}\nA: ",
            end="",
            file=err,
            flush=True,
        )
        assistant = {"type": "function", "function": {"name": call.name, "arguments": call.arguments}}
        messages += [
            {"role": "assistant", "content": "", "tool_calls": [assistant]},
            {"role": "tool", "content": json.dumps(result)},
        ]
        stream_to_console(
            engine.stream(messages, tools=[WEATHER_TOOL], max_tokens=max_tokens, enable_thinking=False)
        )
        print(file=err)
        print_stats(engine.stats)
    finally:
        engine.close()
    return 0
