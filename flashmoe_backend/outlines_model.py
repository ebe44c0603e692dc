"""``from_mlxlm``: an ``outlines`` model whose structured generation works on every MLX backend.

Stock outlines 1.3.3 applies its masks with a Metal-only kernel. The model here is an
``outlines.models.MLXLM`` whose constraints are built and applied by ``structured.py``
(:class:`~flashmoe_backend.structured.Constraint`), so ``model(prompt, PydanticModel)`` works on CPU
and CUDA too.
"""

from __future__ import annotations

from typing import Any

from .json_schema import DEFAULT_WHITESPACE
from .structured import ConstrainedLogitsProcessor, Constraint
from .vocabulary import Vocabulary

__all__ = ["from_mlxlm"]


def _portable_mlxlm_class() -> type:
    from outlines.backends.outlines_core import OutlinesCoreLogitsProcessor
    from outlines.models.mlxlm import MLXLM
    from outlines.processors import OutlinesLogitsProcessor

    class PortableMLXLM(MLXLM):
        """``outlines.models.MLXLM`` whose structured generation masks logits portably.

        ``model(prompt, output_type, max_tokens=...)`` and ``model.stream(...)`` build the
        constraint with :class:`Constraint` (cached index, byte-level vocabulary, tight JSON
        whitespace) and return the generated text, like stock outlines. Logits processors made
        by stock outlines (``outlines.Generator(model, T)``, outlines-core backend) are accepted
        too: their index is reused and only the masking is replaced.
        """

        whitespace_pattern: str | None = DEFAULT_WHITESPACE

        def constraint(self, output_type: Any) -> Constraint:
            return Constraint.from_response_format(
                output_type, self.mlx_tokenizer, whitespace_pattern=self.whitespace_pattern
            )

        def _processor(self, output_type: Any) -> Any:
            if output_type is None or isinstance(output_type, ConstrainedLogitsProcessor):
                return output_type
            if isinstance(output_type, OutlinesCoreLogitsProcessor):
                return ConstrainedLogitsProcessor(
                    output_type.index, Vocabulary.from_tokenizer(self.mlx_tokenizer),
                    sentinel=False,
                )
            if isinstance(output_type, OutlinesLogitsProcessor):
                return output_type  # another backend's processor: stock behaviour
            return self.constraint(output_type).logits_processor()

        def __call__(self, model_input: Any, output_type: Any = None, backend: Any = None,
                     **inference_kwargs: Any) -> Any:
            if output_type is None:
                return self.generate(model_input, None, **inference_kwargs)
            _reject_backend(backend)
            return self.generate(model_input, self._processor(output_type), **inference_kwargs)

        def stream(self, model_input: Any, output_type: Any = None, backend: Any = None,
                   **inference_kwargs: Any) -> Any:
            if output_type is not None:
                _reject_backend(backend)
            return self.generate_stream(model_input, self._processor(output_type),
                                        **inference_kwargs)

        def generate(self, model_input: Any, output_type: Any = None, **kwargs: Any) -> str:
            return super().generate(model_input, self._processor(output_type), **kwargs)

        def generate_stream(self, model_input: Any, output_type: Any = None, **kwargs: Any):
            return super().generate_stream(model_input, self._processor(output_type), **kwargs)

    return PortableMLXLM


def _reject_backend(backend: Any) -> None:
    if backend not in (None, "outlines_core"):
        raise NotImplementedError(
            f"backend {backend!r} is not supported by flashmoe's portable outlines model "
            "(only outlines_core is; llguidance/xgrammar masks are Metal-only in outlines 1.3)"
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
