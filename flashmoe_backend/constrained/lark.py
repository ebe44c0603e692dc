"""Lark building blocks for llguidance grammars: literals, regexes, grammar documents."""

from __future__ import annotations

import json

__all__ = ["THINK_BLOCK_RULES", "grammar_document", "lark_literal", "lark_regex"]


def lark_literal(text: str) -> str:
    """``text`` as a Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


def lark_regex(pattern: str) -> str:
    """``pattern`` (anchors dropped: a match is always the whole text) as a Lark regex."""
    if pattern.startswith("^"):
        pattern = pattern[1:]
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1]
    out, i = [], 0
    while i < len(pattern):  # escape unescaped '/' (the Lark delimiter)
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            out.append(pattern[i : i + 2])
            i += 2
            continue
        out.append("\\/" if c == "/" else c)
        i += 1
    return "/" + "".join(out) + "/"


def grammar_document(main: str, **named: str) -> str:
    """llguidance's grammar document: the Lark grammar ``main`` plus named Lark grammars it
    refers to as ``@name``."""
    grammars = [{"name": "main", "lark_grammar": main}]
    grammars += [{"name": k, "lark_grammar": v} for k, v in named.items()]
    return json.dumps({"grammars": grammars}, ensure_ascii=False)


#: Text up to and including the first ``</think>`` (lazy: the shortest such text).
THINK_BLOCK_RULES = 'think_block[lazy]: ANY_TEXT "</think>"\nANY_TEXT: /(?s:.*)/'


