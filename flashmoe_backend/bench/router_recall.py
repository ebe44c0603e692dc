"""How well can a layer's experts be predicted before it routes? The prefetch predictor's recall.

Reading layer L+1's experts ahead needs a guess at them. The guess: layer L+1's own router applied
to an earlier hidden state, normalized by layer L+1's own norm (the norm rescales each token by
its RMS, so only the state differs from the one the router will really see):

* ``layer_ahead``: ``h_L``, layer L's residual after its attention, known before layer L's MoE
  block; the read then has that block and layer L+1's attention to hide behind;
* ``attention_ahead``: ``x_{L+1}``, layer L+1's input; only its attention to hide behind.

Against them, two references: ``previous_token`` (the experts layer L+1 used for the previous
token, which a cache keeps anyway) and ``chance`` (k / experts). Recall is the share of the experts
layer L+1 really uses that the guess names (both have k). Works on mlx-lm decoder layers with
``input_layernorm``, ``post_attention_layernorm`` and an MoE block with ``gate`` and ``top_k``
(Qwen3-MoE, Qwen3.5-MoE, Qwen3-Next).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np

PREDICTORS = ("layer_ahead", "attention_ahead", "previous_token")


class _Recorder(nn.Module):
    """Runs ``inner`` (a norm) and keeps its input's last position."""

    def __init__(self, inner: nn.Module, keep):
        super().__init__()
        self.inner = inner
        self._keep = keep

    def __call__(self, x: mx.array) -> mx.array:
        self._keep(x[:, -1])
        return self.inner(x)


def moe_layers(model) -> list:
    """The decoder layers of ``model`` that route (an MoE block with ``gate`` and ``top_k``)."""
    return [layer for layer in model.layers if hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "top_k")]


@contextlib.contextmanager
def record_states(model) -> Iterator[list[dict[str, list[mx.array]]]]:
    """Record, per forward pass, each MoE layer's input ``x`` and post-attention residual ``h`` at
    the last position (``{"x": [...], "h": [...]}`` in layer order) into the list yielded."""
    passes: list[dict[str, list[mx.array]]] = []
    layers = moe_layers(model)

    def keeper(name: str, first: bool):
        def keep(state: mx.array) -> None:
            if first and name == "x":
                passes.append({"x": [], "h": []})
            passes[-1][name].append(state)
        return keep

    for i, layer in enumerate(layers):
        layer.input_layernorm = _Recorder(layer.input_layernorm, keeper("x", i == 0))
        layer.post_attention_layernorm = _Recorder(layer.post_attention_layernorm, keeper("h", False))
    try:
        yield passes
    finally:
        for layer in layers:
            layer.input_layernorm = layer.input_layernorm.inner
            layer.post_attention_layernorm = layer.post_attention_layernorm.inner


def _route(layer, state: mx.array) -> set[int]:
    """The experts ``layer``'s router picks for ``state`` (pre-norm), as the MoE block does."""
    logits = layer.mlp.gate(layer.post_attention_layernorm(state))
    k = layer.mlp.top_k
    return set(np.array(mx.argpartition(logits, kth=-k, axis=-1)[..., -k:]).reshape(-1).tolist())


def routed(model, passes: list[dict[str, list[mx.array]]]) -> list[list[set[int]]]:
    """Per recorded pass and MoE layer, the experts the layer really used (for the last position)."""
    layers = moe_layers(model)
    return [[_route(layer, h) for layer, h in zip(layers, p["h"], strict=True)] for p in passes]


def next_layer_recall(model, sequences: list[list[dict[str, list[mx.array]]]]) -> dict:
    """Each predictor's mean recall over consecutive MoE layer pairs and the recorded passes of
    ``sequences`` (one list of passes per generation: ``previous_token`` looks back within it),
    overall and per target layer, with the chance level."""
    layers = moe_layers(model)
    hits: dict[str, list[list[float]]] = {p: [[] for _ in layers[1:]] for p in PREDICTORS}
    for passes in sequences:
        actual = routed(model, passes)
        for t, p in enumerate(passes):
            for j, layer in enumerate(layers[1:]):
                want, k = actual[t][j + 1], layer.mlp.top_k
                guesses = {"layer_ahead": _route(layer, p["h"][j]),
                           "attention_ahead": _route(layer, p["x"][j + 1])}
                if t > 0:
                    guesses["previous_token"] = actual[t - 1][j + 1]
                for name, guess in guesses.items():
                    hits[name][j].append(len(guess & want) / k)
    k, experts = layers[0].mlp.top_k, layers[0].mlp.gate.weight.shape[0]
    return {
        "sequences": len(sequences),
        "passes": sum(map(len, sequences)),
        "layer_pairs": len(layers) - 1,
        "k": k,
        "experts": experts,
        "chance": k / experts,
        "recall": {name: float(np.mean(sum(rows, []))) for name, rows in hits.items()},
        "recall_per_target_layer": {name: [float(np.mean(r)) for r in rows] for name, rows in hits.items()},
    }
