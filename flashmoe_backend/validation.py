"""The engine's checks of a request, as small pure functions: each raises one of the
:mod:`~flashmoe_backend.errors` types with a message naming what is wrong, or returns the value in
the form the engine uses.

``FlashMoE.load`` and ``FlashMoE.stream`` call them before reading or prefilling anything, so the
integrations (which only translate their frameworks' types) inherit the same errors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any

from flashmoe_backend.errors import ContextWindowError, ParameterError, PromptError, ToolError

#: The message roles the engine sends to a chat template.
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
_MESSAGE_HINT = "expected a dict with 'role' and 'content'"
_PROMPT_KINDS = "a string, a list of token ids, or a list of messages ({'role': ..., 'content': ...})"

# -- parameters ---------------------------------------------------------------------------------


def a_type(value: Any) -> str:
    """The type of ``value`` with its article, for messages: "an int", "a str", "a NoneType"."""
    name = type(value).__name__
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def check_int(name: str, value: Any, minimum: int, *, none_means: str | None = None) -> None:
    """``value`` is an int >= ``minimum`` (or ``None`` when ``none_means`` says what it means)."""
    if value is None and none_means is not None:
        return
    if not _is_int(value) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        alternative = f" (or None: {none_means})" if none_means else ""
        raise ParameterError(f"{name} must be {kind}{alternative}, got {value!r}")


def check_number(
    name: str,
    value: Any,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    optional: bool = False,
) -> None:
    """``value`` is a finite number in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    if value is None and optional:
        return
    in_range = _is_number(value) and (value > low if low_open else value >= low) and value <= high
    if not in_range:
        bracket = "(" if low_open else "["
        span = (
            f">{'' if low_open else '='} {low:g}" if high == math.inf else f"in {bracket}{low:g}, {high:g}]"
        )
        raise ParameterError(f"{name} must be a number {span}, got {value!r}")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ParameterError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_bool(name: str, value: Any, *, optional: bool = False) -> None:
    if not (isinstance(value, bool) or (optional and value is None)):
        alternative = ", or None" if optional else ""
        raise ParameterError(f"{name} must be True or False{alternative}, got {value!r}")


def check_stop(stop: Any) -> tuple[str, ...]:
    """Stop strings as a tuple: one string or a list of non-empty strings."""
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, Sequence) or isinstance(stop, bytes):
        raise ParameterError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    for i, s in enumerate(stop):
        if not isinstance(s, str):
            raise ParameterError(f"stop #{i} must be a string, got {s!r}")
        if not s:
            raise ParameterError(f"stop #{i}: stop strings must be non-empty")
    return tuple(stop)


def check_processors(processors: Any) -> tuple:
    """Logits processors as a tuple of callables ``(tokens, logits) -> logits``."""
    if callable(processors) or isinstance(processors, (str, bytes)) or not isinstance(processors, Sequence):
        raise ParameterError(
            "logits_processors must be a list of callables (tokens, logits) -> logits, "
            f"got {type(processors).__name__}"
        )
    for i, p in enumerate(processors):
        if not callable(p):
            raise ParameterError(f"logits_processors #{i} is not callable: {p!r}")
    return tuple(processors)


def check_seed(seed: Any) -> None:
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**64):
        raise ParameterError(f"seed must be an integer in [0, 2**64), or None, got {seed!r}")


# -- prompts ------------------------------------------------------------------------------------


def _content_text(i: int, role: str, content: Any) -> str:
    """A message's content as text: a string, or a list of text parts (joined, as the chat
    templates do); anything else is refused, naming the message and the part."""
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":  # OpenAI: no content beside tool calls
        return ""
    if not isinstance(content, (list, tuple)):
        raise PromptError(
            f"message #{i} ({role}): content must be a string or a list of content parts, "
            f"got {type(content).__name__}"
        )
    texts = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, Mapping):
            raise PromptError(
                f"message #{i} content part #{j} is {a_type(part)}, expected "
                "{'type': 'text', 'text': ...}"
            )
        kind = part.get("type", "text" if "text" in part else None)
        if kind != "text":
            raise PromptError(
                f"message #{i} content part #{j}: unsupported type {kind!r}; flashmoe "
                "models take text only (parts of type 'text')"
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise PromptError(
                f"message #{i} content part #{j}: 'text' must be a string, got {type(text).__name__}"
            )
        texts.append(text)
    return "".join(texts)


def _check_tool_calls(i: int, role: str, calls: Any) -> None:
    if role != "assistant":
        raise PromptError(f"message #{i} ({role}): only assistant messages carry tool_calls")
    if not isinstance(calls, (list, tuple)):
        raise PromptError(f"message #{i}: tool_calls must be a list, got {type(calls).__name__}")
    for k, call in enumerate(calls):
        if not isinstance(call, Mapping):
            raise PromptError(
                f"message #{i} tool call #{k} is {a_type(call)}, expected "
                "{'type': 'function', 'function': {'name': ..., 'arguments': ...}}"
            )
        function = call.get("function", call)
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise PromptError(f"message #{i} tool call #{k} has no function name")


def check_message(i: int, message: Any) -> dict:
    """One chat message, checked; a copy whose content is a string. A user message must hold
    some text (as a string prompt must not be empty); other roles' content may be empty."""
    if not isinstance(message, Mapping):
        raise PromptError(f"message #{i} is {a_type(message)}, {_MESSAGE_HINT}")
    if "role" not in message:
        raise PromptError(f"message #{i} has no 'role'; {_MESSAGE_HINT}")
    role = message["role"]
    if role not in ROLES:
        raise PromptError(
            f"message #{i}: unknown role {role!r}; expected one of {', '.join(map(repr, ROLES))}"
        )
    calls = message.get("tool_calls")
    if calls is not None:
        _check_tool_calls(i, role, calls)
    if "content" not in message and not (role == "assistant" and calls):
        raise PromptError(f"message #{i} ({role}) has no 'content'")
    reasoning = message.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        raise PromptError(f"message #{i}: reasoning_content must be a string, got {type(reasoning).__name__}")
    content = _content_text(i, role, message.get("content"))
    if role == "user" and not content:  # as an empty string prompt: nothing to answer
        raise PromptError(f"message #{i} (user): the content is empty; a user message needs text")
    return {**message, "content": content}


def check_prompt(prompt: Any, vocab_size: int | None = None) -> str | list[int] | list[dict]:
    """A prompt, checked: a non-empty string, token ids in the vocabulary, or chat messages (copies
    with string content). Raises ``PromptError`` naming the item at fault."""
    if isinstance(prompt, str):
        if not prompt:
            raise PromptError("the prompt is an empty string")
        return prompt
    if isinstance(prompt, Mapping):
        raise PromptError(
            f"the prompt is a dict: wrap one message in a list ([message]); a prompt is {_PROMPT_KINDS}"
        )
    if not isinstance(prompt, Sequence) or isinstance(prompt, (bytes, bytearray)):
        raise PromptError(f"the prompt must be {_PROMPT_KINDS}, got {type(prompt).__name__}")
    if not prompt:
        raise PromptError("the prompt is an empty list: pass at least one message or token id")
    if not _is_int(prompt[0]):
        return [check_message(i, m) for i, m in enumerate(prompt)]
    ids = []
    for j, t in enumerate(prompt):
        if not _is_int(t):
            raise PromptError(
                f"prompt token #{j} is {t!r}: a list prompt holds token ids (ints) only, "
                "or messages (dicts) only"
            )
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            raise PromptError(
                f"prompt token #{j} is {t}, outside the vocabulary (0..{vocab_size - 1})"
                if vocab_size is not None
                else f"prompt token #{j} is {t}, a negative id"
            )
        ids.append(int(t))
    return ids


def check_tools_argument(tools: Any) -> list:
    """``tools`` as a list (``None``: no tools); a single tool or a non-list is refused."""
    if tools is None:
        return []
    if isinstance(tools, Mapping):
        raise ToolError(
            "tools must be a list of tools, got a dict: wrap a single tool in a list (tools=[tool])"
        )
    if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
        raise ToolError(f"tools must be a list of tools, got {type(tools).__name__}")
    return list(tools)


# -- context window -----------------------------------------------------------------------------


def reply_budget(prompt_tokens: int, max_tokens: int | None, context: int | None) -> int:
    """The ``max_tokens`` a generation runs with: the caller's, checked against the context window,
    or (``None``) all the positions the prompt leaves. Raises ``ContextWindowError`` when the
    prompt and reply do not fit."""
    if context is None:
        if max_tokens is None:
            raise ParameterError(
                "max_tokens=None (up to the context window) needs the model config's "
                "max_position_embeddings; pass a number"
            )
        return max_tokens
    if prompt_tokens >= context:
        raise ContextWindowError(
            f"the prompt is {prompt_tokens} tokens, the model's context window is "
            f"{context}: no room for a reply; shorten the prompt"
        )
    if max_tokens is None:
        return context - prompt_tokens
    if prompt_tokens + max_tokens > context:
        raise ContextWindowError(
            f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is "
            f"{prompt_tokens + max_tokens} tokens, beyond the model's context window of {context}; "
            f"lower max_tokens to at most {context - prompt_tokens}, pass max_tokens=None to "
            "generate up to the end of the context, or shorten the prompt"
        )
    return max_tokens
