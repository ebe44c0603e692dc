"""Constrained decoding: llguidance grammars driven through Outlines' interfaces.

``constraint`` turns a ``response_format`` into a grammar, ``json_schema`` / ``lark`` write the
grammars, ``vocabulary`` bridges the tokenizer to llguidance, ``processor`` applies the masks on
any device, ``outlines_model`` is the Outlines model over the engine, ``json_validation`` and
``unique_items`` check what the grammar cannot."""
