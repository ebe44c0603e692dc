"""``from_mlxlm``: an ``outlines`` model whose structured generation works on every MLX backend.

Stock outlines 1.3.3 applies its llguidance and outlines-core masks with Metal-only kernels, and
its llguidance tokenizer (``llguidance.hf.from_tokenizer``) marks every added token special, so
Qwen's ``<tool_call>`` token cannot be written by a grammar. The model here is an
``outlines.models.MLXLM`` whose output types are compiled by llguidance against
:class:`~flashmoe_backend.vocabulary.Vocabulary` and applied portably by
:class:`~flashmoe_backend.structured.ConstrainedLogitsProcessor`, so ``model(prompt,
PydanticModel)`` works on CPU and CUDA too. Its ``backend`` is ``"llguidance"``.
"""

from __future__ import annotations

from typing import Any

from flashmoe_backend.constrained.constraint import ConstrainedLogitsProcessor, Constraint
from flashmoe_backend.constrained.json_schema import DEFAULT_WHITESPACE

__all__ = ["from_mlxlm"]


def _portable_mlxlm_class() -> type:
    from outlines.backends.llguidance import LLGuidanceLogitsProcessor
    from outlines.models.mlxlm import MLXLM
    from outlines.processors import OutlinesLogitsProcessor

    class PortableMLXLM(MLXLM):
        """``outlines.models.MLXLM`` whose structured generation masks logits portably.

        ``model(prompt, output_type, max_tokens=...)`` and ``model.stream(...)`` build the
        constraint with :class:`Constraint` (llguidance, tight JSON whitespace) and return the
        generated text, like stock outlines. Processors made by stock outlines' llguidance
        backend (``outlines.Generator(model, T, backend="llguidance")``) are accepted too: their
        grammar is recompiled here and only the masking changes.
        """

        whitespace_pattern: str | None = DEFAULT_WHITESPACE

        def constraint(self, output_type: Any) -> Constraint:
            return Constraint.from_response_format(
                output_type, self.mlx_tokenizer, whitespace_pattern=self.whitespace_pattern
            )

        def _processor(self, output_type: Any, max_tokens: int | None = None) -> Any:
            if output_type is None or isinstance(output_type, ConstrainedLogitsProcessor):
                return output_type
            if isinstance(output_type, LLGuidanceLogitsProcessor):
                return Constraint(output_type.grammar, self.mlx_tokenizer).logits_processor()
            if isinstance(output_type, OutlinesLogitsProcessor):
                return output_type  # another backend's processor: stock behaviour
            return self.constraint(output_type).logits_processor(max_tokens)

        def __call__(self, model_input: Any, output_type: Any = None, backend: Any = None,
                     **inference_kwargs: Any) -> Any:
            _check_backend(backend, output_type)
            return self.generate(model_input, output_type, **inference_kwargs)

        def stream(self, model_input: Any, output_type: Any = None, backend: Any = None,
                   **inference_kwargs: Any) -> Any:
            _check_backend(backend, output_type)
            return self.generate_stream(model_input, output_type, **inference_kwargs)

        def generate(self, model_input: Any, output_type: Any = None, **kwargs: Any) -> str:
            proc = self._processor(output_type, kwargs.get("max_tokens"))
            return super().generate(model_input, proc, **kwargs)

        def generate_stream(self, model_input: Any, output_type: Any = None, **kwargs: Any):
            proc = self._processor(output_type, kwargs.get("max_tokens"))
            return super().generate_stream(model_input, proc, **kwargs)

    return PortableMLXLM


def _check_backend(backend: Any, output_type: Any) -> None:
    if output_type is not None and backend not in (None, "llguidance"):
        raise NotImplementedError(
            f"backend {backend!r} is not supported by flashmoe's portable outlines model: its "
            "constraints run on llguidance (backend='llguidance', the default)"
        )


_PORTABLE_CLS: type | None = None


def from_mlxlm(model: Any, tokenizer: Any) -> Any:
    """An outlines model for an mlx-lm model and tokenizer whose structured generation works on
    every MLX backend: ``from_mlxlm(m, t)(prompt, MyPydanticModel, max_tokens=200)`` returns JSON
    text that ``MyPydanticModel.model_validate_json`` accepts. Drop-in for
    ``outlines.from_mlxlm`` (the object is an ``outlines.models.MLXLM``)."""
    global _PORTABLE_CLS
    if _PORTABLE_CLS is None:
        _PORTABLE_CLS = _portable_mlxlm_class()
    return _PORTABLE_CLS(model, tokenizer)
