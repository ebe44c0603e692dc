"""What every front end shares: the glue between a chat API and the engine, said once.

The LangChain and LlamaIndex integrations and the OpenAI-compatible server translate their own
types to and from these, and hold no engine logic of their own:

* settings: :func:`generation_settings` (a model object's ``GenerationParams`` fields that are
  set) and :func:`check_bound_tools` (tools and a tool choice refused when bound, with the
  engine's checks);
* tool calls: :func:`engine_tool_call` / :func:`engine_tool_calls` (an assistant message's calls,
  OpenAI-style, as the engine's chat template takes them) and :func:`openai_tool_calls` /
  :func:`invalid_tool_calls` (a result's calls as dicts);
* results: :func:`usage` (token counts, with one precedence) and :func:`openai_finish_reason`;
* requests: :func:`engine_response_format` (OpenAI's ``{"type": "text"}`` is no constraint).

The engines themselves are shared with ``FlashMoE.shared(store, ...)`` (one per resolved store
and load options) and released with ``FlashMoE.release_shared()``; the context window is
``FlashMoE.context_window``. Nothing here imports a front end's framework.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flashmoe_backend.engine import check_tools
from flashmoe_backend.generation.params import SETTING_NAMES

if TYPE_CHECKING:
    from flashmoe_backend.generation.params import FinishReason, GenerationResult

__all__ = [
    "Usage",
    "check_bound_tools",
    "engine_arguments",
    "engine_response_format",
    "engine_tool_call",
    "engine_tool_calls",
    "generation_settings",
    "invalid_tool_calls",
    "openai_finish_reason",
    "openai_tool_calls",
    "usage",
]

# -- settings ---------------------------------------------------------------------------------


def generation_settings(model: Any) -> dict[str, Any]:
    """The generation settings a front end's model object holds, as the engine's keyword
    arguments: its attributes named like ``GenerationParams``' settings (``SETTING_NAMES``) that
    are not ``None``, and ``stop`` when it lists any. The others are left to the store's
    defaults."""
    settings = {name: getattr(model, name) for name in SETTING_NAMES if getattr(model, name) is not None}
    stop = getattr(model, "stop", None)
    if stop:
        settings["stop"] = list(stop)
    return settings


def check_bound_tools(tools: Sequence[Any], tool_choice: Any = None) -> None:
    """Refuse bad tools and a bad tool choice when they are bound rather than when first called,
    with the engine's own checks (``engine.check_tools``: ``ToolError`` naming the tool).

    Tools are checked one by one, so a repeated name is left to the engine, which refuses it
    when the tools are used (binding the same schema twice must succeed); the choice is checked
    against all of them.
    """
    specs = {spec.name: spec for tool in tools for spec in check_tools([tool])[0]}
    if tool_choice is not None:
        check_tools(list(specs.values()), tool_choice)


# -- tool calls -------------------------------------------------------------------------------


def engine_arguments(arguments: Any) -> Any:
    """Tool-call arguments as the chat template takes them: a dict where they can be read as one
    (JSON text of an object is parsed, ``None`` or blank text is ``{}``), otherwise the text as the
    model wrote it (a malformed call of an earlier turn is shown as it was)."""
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return arguments
        return parsed if isinstance(parsed, dict) else arguments
    return dict(arguments) if arguments is not None else {}


def engine_tool_call(name: str | None, arguments: Any, call_id: str | None = None) -> dict:
    """One call of an assistant message, OpenAI-style, as the engine takes it:
    ``{"id", "type": "function", "function": {"name", "arguments": <dict>}}``. A call without an
    id is given its tool's name as one (so that a tool result can still answer it)."""
    return {
        "id": call_id or name,
        "type": "function",
        "function": {"name": name, "arguments": engine_arguments(arguments)},
    }


def engine_tool_calls(calls: Iterable[Mapping[str, Any]]) -> list[dict]:
    """An OpenAI assistant message's ``tool_calls`` (arguments as JSON text) as the engine's
    (arguments as dicts): the way back of :func:`openai_tool_calls`."""
    out = []
    for call in calls:
        function = call.get("function") or {}
        out.append(engine_tool_call(function.get("name"), function.get("arguments"), call.get("id")))
    return out


def openai_tool_calls(result: GenerationResult) -> list[dict]:
    """A result's valid tool calls as OpenAI's: ``{"id", "type": "function", "function": {"name",
    "arguments": <JSON text>}}``."""
    return [call.to_openai() for call in result.tool_calls]


def invalid_tool_calls(result: GenerationResult) -> list[dict]:
    """A result's calls that did not parse or match their tool's schema, as
    ``{"id", "name", "arguments": <the text written>, "error"}`` (OpenAI has no such field; each
    front end puts them where its framework expects them)."""
    return [
        {"id": c.id, "name": c.name, "arguments": c.arguments, "error": c.error}
        for c in result.invalid_tool_calls
    ]


# -- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """Token counts of one generation, with OpenAI's meanings: ``prompt_tokens`` counts the whole
    prompt, ``cached_tokens`` (a part of it) those served from a prompt-cache snapshot."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int]:
        """``{"prompt_tokens", "completion_tokens", "total_tokens"}``."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's ``usage`` object: :meth:`to_dict` plus ``prompt_tokens_details.cached_tokens``."""
        return {**self.to_dict(), "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


def usage(result: GenerationResult) -> Usage:
    """The token counts of a result.

    The prompt is what the model conditioned on: every token of ``prompt_token_ids``, whether the
    engine prefilled it now or restored it from a prompt-cache snapshot. OpenAI counts cached
    tokens in ``prompt_tokens`` too (``cached_tokens`` is a detail of it), so the ids come first;
    ``stats.prompt_tokens`` (the same number, set by the engine) only stands in for a result that
    does not keep its ids. Likewise the completion is ``token_ids``, then
    ``stats.generated_tokens``.
    """
    stats = result.stats
    return Usage(
        prompt_tokens=len(result.prompt_token_ids) or stats.prompt_tokens,
        completion_tokens=len(result.token_ids) or stats.generated_tokens,
        cached_tokens=stats.prompt_cached_tokens,
    )


#: The engine's finish reasons as OpenAI's: ``incomplete`` (constrained output cut off before the
#: structure closed, by ``max_tokens``) is a ``length``.
_OPENAI_FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "incomplete": "length",
}


def openai_finish_reason(reason: FinishReason) -> str:
    """OpenAI's ``finish_reason`` (``stop``, ``length`` or ``tool_calls``) of the engine's."""
    return _OPENAI_FINISH_REASONS[reason]


# -- requests ---------------------------------------------------------------------------------


def engine_response_format(response_format: Any) -> Any:
    """An OpenAI-style ``response_format`` as the engine takes it: ``None`` for free text
    (``None`` or ``{"type": "text"}``); anything else (``json_schema`` and ``json_object`` dicts,
    JSON schemas, Pydantic models, ...) is the engine's to read and to refuse."""
    if isinstance(response_format, Mapping) and response_format.get("type") == "text":
        return None
    return response_format
