"""The embedded demo model: a valid store in the package, and `flashmoe demo` does its job offline."""

from __future__ import annotations

from flashmoe_backend.cli import main
from flashmoe_backend.demo import default_store
from flashmoe_backend.store import read_manifest, verify_store


def test_embedded_store_is_intact():
    store = default_store()
    assert verify_store(store).ok
    assert read_manifest(store).model_type == "qwen3_5_moe"


def test_demo_answers_from_the_document_and_calls_the_tool(capsys):
    assert main(["demo"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0].strip() == "pharmacist"  # the answer, copied from the document
    assert 'tool call: get_weather({"city": "Lisbon"})' in err
    assert "hit rate" in err and "MiB read" in err
