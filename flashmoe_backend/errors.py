"""The exceptions and warnings flashmoe raises for a caller's mistake, in one place.

Every bad argument of ``FlashMoE.load`` / ``stream`` / ``generate`` raises one of these before
anything is read from the store or prefilled, with a message that names the message index, field,
keyword or value at fault. The LangChain and LlamaIndex integrations raise the same types for the
same problems, because they hand the request to the engine unchanged.

The types subclass what users already catch: a missing store is a ``FileNotFoundError`` (and a
``StoreError``), a bad request a ``ValueError``, an unknown keyword argument a ``TypeError``.
``USER_ERRORS`` is the tuple a command line maps to a one-line error.
"""

from __future__ import annotations

from flashmoe_backend.store.format import StoreError


class FlashMoEError(Exception):
    """Base of flashmoe's errors for a caller's mistake (not for a bug in flashmoe)."""


class StoreNotFoundError(StoreError, FileNotFoundError, FlashMoEError):
    """No store at the path given: no such directory, or a directory without a manifest."""


class InvalidRequestError(FlashMoEError, ValueError):
    """Base of the errors of a bad argument: prompt, tools, response format, parameter, context."""


class PromptError(InvalidRequestError):
    """A malformed prompt: not a string, token ids or messages; an unknown role; content that is
    not text; an empty prompt; a token id outside the vocabulary."""


class ToolError(InvalidRequestError):
    """Bad ``tools`` (wrong type, malformed schema, duplicate name) or a ``tool_choice`` that
    names no tool."""


class ResponseFormatError(InvalidRequestError):
    """A ``response_format`` that is not a supported kind, or a schema that cannot be compiled."""


class ParameterError(InvalidRequestError):
    """A generation or load parameter with a bad value (``max_tokens=0``, ``top_p=2``,
    ``cache_gb=0``, ...)."""


class ContextWindowError(InvalidRequestError):
    """The prompt plus ``max_tokens`` do not fit the model's context window."""


class UnknownArgumentError(InvalidRequestError, TypeError):
    """A keyword argument the engine does not take (a ``TypeError``, as Python's own)."""


class DistributedError(FlashMoEError, RuntimeError):
    """A group of ranks running one model (``mlx.launch``) failed: a rank died, hangs or is
    unreachable (the message says what was being waited for), the ranks loaded different models,
    or a call was made on the wrong rank. A group cannot be repaired: restart all ranks."""


class CacheBudgetWarning(UserWarning):
    """The expert cache cannot hold one token's experts of a layer: every token reads them again."""


class PromptCacheWarning(UserWarning):
    """A prompt-cache file (``prompt_cache_dir``) was ignored or not written: the prefix is
    prefilled instead, so the output is unchanged, only slower."""


#: What a front end (the CLI) reports as a one-line error instead of a traceback.
USER_ERRORS: tuple[type[Exception], ...] = (FlashMoEError, StoreError)

__all__ = [
    "USER_ERRORS",
    "CacheBudgetWarning",
    "ContextWindowError",
    "DistributedError",
    "FlashMoEError",
    "InvalidRequestError",
    "ParameterError",
    "PromptCacheWarning",
    "PromptError",
    "ResponseFormatError",
    "StoreError",
    "StoreNotFoundError",
    "ToolError",
    "UnknownArgumentError",
]
