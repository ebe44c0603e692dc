"""Tool-call formats, one a module, each a grammar for one call of a tool.

Every format module has ``call_rules(tool, rule) -> str``: Lark rules, the first named ``rule``,
for the text of one call *after* its ``<tool_call>`` opener up to and including ``</tool_call>``,
and ``open_json_value(text, tools)``: where the JSON value being written in a reply starts (its
schema, the root schema and the offset), which the ``uniqueItems`` guard follows.
``tools/grammar.py`` puts them together for ``tool_choice`` and parallel calls;
``tools/calls.py`` parses both formats back.
"""

from flashmoe_backend.tools import hermes, xml

#: format name -> module, as :func:`~flashmoe_backend.tools.specs.detect_tool_format` names them.
FORMATS = {"xml": xml, "hermes": hermes}

__all__ = ["FORMATS", "hermes", "xml"]
