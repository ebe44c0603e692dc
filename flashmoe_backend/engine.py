"""``FlashMoE``: load a store into an mlx-lm model whose experts stream from disk, and generate.

``engine.model`` is the mlx-lm model of the store's architecture with every ``SwitchGLU``
replaced by a ``StreamingSwitch``; ``engine.tokenizer`` is mlx-lm's ``TokenizerWrapper``. Both
work with mlx-lm's and Outlines' own generation code unchanged.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from mlx_lm.utils import _get_classes, load_model, load_tokenizer

from .aio import iterate_in_thread
from .cache import DEFAULT_POLICY, CacheCounters, ExpertCache, Policy
from .generate import (
    Chunk,
    GenerationParams,
    GenerationResult,
    Prompt,
    TokenStream,
    encode_prompt,
    finish_stats,
)
from .kernels.gated_delta import install_fast_gated_delta
from .output import MarkupFilter, OutputPlan, prompt_in_think
from .prompt_cache import PromptCache, message_boundaries, prefill
from .reader import ExpertReader, PageCache, ReaderConfig, Verify
from .stats import Stats
from .store import Manifest, StoreError, check_store, read_config, read_manifest
from .streaming import ExpertStreamer, StreamCounters, install_streaming
from .tool_calls import normalize_tool_choice, normalize_tools

GB = 1024**3
_PARAM_NAMES = {f.name for f in fields(GenerationParams)}


def _with_top_k(config: dict, k: int | None) -> dict:
    """Config overrides that set the number of experts per token (K) where the model reads it."""
    if k is None:
        return {}
    if k < 1:
        raise ValueError(f"experts_per_token must be >= 1, got {k}")
    if "text_config" in config:
        text = copy.deepcopy(config["text_config"])
        text["num_experts_per_tok"] = k
        return {"text_config": text}
    return {"num_experts_per_tok": k}


class FlashMoE:
    """A streaming-experts MoE engine. Create it with ``FlashMoE.load(store_dir, ...)``."""

    def __init__(self, store: Path, model, tokenizer, config: dict, manifest: Manifest,
                 streamer: ExpertStreamer, prefill_step_size: int, prompt_cache_entries: int):
        self.store = store
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.manifest = manifest
        self.streamer = streamer
        self.prefill_step_size = prefill_step_size
        self.prompt_cache = PromptCache(prompt_cache_entries)
        self.stats = Stats()
        self.lock = threading.Lock()  # one generation at a time: the model and cache are shared

    @classmethod
    def load(
        cls,
        store: str | Path,
        cache_gb: float = 4.0,
        experts_per_token: int | None = None,
        *,
        io_threads: int = 8,
        page_cache: PageCache = "bypass",
        verify: Verify = "first",
        policy: Policy = DEFAULT_POLICY,
        prefill_step_size: int = 2048,
        prompt_cache_entries: int = 4,
    ) -> FlashMoE:
        """Load a store made by ``flashmoe pack``.

        Args:
            store: the store directory.
            cache_gb: byte budget of the expert cache, in GiB.
            experts_per_token: override the model's top-k (K). ``None`` keeps the model's own
                routing exactly; fewer experts is faster but changes the model's output.
            io_threads: parallel expert reads.
            page_cache: "bypass" (O_DIRECT: our cache is the only copy) or "keep".
            verify: when to check record checksums: "first" read of each record, "always",
                or "never".
            policy: cache replacement policy, "lfu" (default: closest to Belady on the
                calibrated routing trace, see bench/RESULTS.md) or "lru".
            prefill_step_size: prompt tokens per layer-major prefill chunk.
            prompt_cache_entries: how many prompt-prefix snapshots to keep for reuse (0: none).
        """
        store = Path(store).expanduser()
        manifest = read_manifest(store)
        config = read_config(store)
        check_store(store, manifest, config)
        install_fast_gated_delta()  # mlx-lm's fast GatedDeltaNet path is Metal-only
        cache = ExpertCache(int(cache_gb * GB), policy=policy)
        reader = ExpertReader(store, manifest, ReaderConfig(io_threads, page_cache, verify))
        streamer = ExpertStreamer(manifest, reader, cache)

        def streaming_classes(config: dict):
            model_class, args_class = _get_classes(config)

            class StreamingModel(model_class):
                def __init__(self, args):
                    super().__init__(args)
                    install_streaming(self, manifest, streamer)

            StreamingModel.__name__ = model_class.__name__
            return StreamingModel, args_class

        try:
            model, config = load_model(store, strict=True, get_model_classes=streaming_classes,
                                       model_config=_with_top_k(config, experts_per_token))
        except (ValueError, KeyError) as e:
            if isinstance(e, StoreError):
                raise
            raise StoreError(f"{store}: resident weights do not fit the model: {e}") from e
        try:
            tokenizer = load_tokenizer(store)
        except Exception as e:
            raise StoreError(f"{store}: cannot load the tokenizer: {e}") from e
        return cls(store, model, tokenizer, config, manifest, streamer, prefill_step_size,
                   prompt_cache_entries)

    # -- generation ------------------------------------------------------------------------

    def encode(self, prompt: Prompt, tools: Sequence[dict] | None = None,
               enable_thinking: bool | None = None) -> list[int]:
        """Token ids of a prompt (string, token ids, or chat messages)."""
        return encode_prompt(self.tokenizer, prompt, tools=tools, enable_thinking=enable_thinking)

    def stream(
        self,
        prompt: Prompt,
        *,
        tools: Sequence[Any] | None = None,
        tool_choice: Any = None,
        parallel_tool_calls: bool = True,
        response_format: Any = None,
        **kwargs,
    ) -> Iterator[Chunk | GenerationResult]:
        """Yield ``Chunk``s of content (and reasoning) as they are generated, then one
        ``GenerationResult``.

        Args:
            prompt: a string, token ids, or chat messages (rendered by the chat template).
            tools: OpenAI-style function specs, rendered into the prompt in the model's own
                tool-call format.
            tool_choice: "auto" (default with tools; calls parsed when the model makes them),
                "none", "required", or a tool name / ``{"type": "function", "function":
                {"name": ...}}``; required and named calls are forced by a grammar.
            parallel_tool_calls: allow more than one call.
            response_format: constrain the output: a Pydantic model, a JSON schema,
                ``{"type": "json_object"}``, a regex, a list of choices (see ``structured``);
                the result's ``parsed`` holds the object.
            **kwargs: ``GenerationParams`` (max_tokens, temperature, top_p, top_k, min_p,
                repetition_penalty, seed, stop, logits_processors, enable_thinking). Constrained
                output turns thinking off unless ``enable_thinking=True`` is passed.

        Bad tools, tool choices and schemas raise ``ValueError`` here, at the call, before
        anything is generated.
        """
        params = _params(kwargs)
        specs = normalize_tools(tools)
        choice, _ = normalize_tool_choice(tool_choice, specs)
        if params.enable_thinking is None and (response_format is not None
                                               or choice in ("required", "named")):
            params.enable_thinking = False
        rendered = [s.to_openai() for s in specs] if specs and choice != "none" else None
        prompt_ids = self.encode(prompt, rendered, params.enable_thinking)
        in_think = prompt_in_think(self.tokenizer, prompt_ids)
        plan = OutputPlan.build(self.tokenizer, tools=specs, tool_choice=tool_choice,
                                parallel_tool_calls=parallel_tool_calls,
                                response_format=response_format, in_think=in_think)
        is_chat = not isinstance(prompt, str) and isinstance(prompt[0], dict)
        boundaries = (message_boundaries(self.tokenizer, prompt, prompt_ids, rendered)
                      if is_chat else [])
        return self._run(prompt_ids, boundaries, params, plan, in_think)

    def _run(self, prompt_ids: list[int], boundaries: list[int], params: GenerationParams,
             plan: OutputPlan, in_think: bool) -> Iterator[Chunk | GenerationResult]:
        with self.lock, self.streamer.record_steps() as steps:
            before = self._counters()
            tic = time.perf_counter()
            cache, reused = self._prefill(prompt_ids, boundaries)
            prefill_seconds = time.perf_counter() - tic
            tokens = TokenStream(self.model, self.tokenizer, prompt_ids[-1:], params,
                                 self.prefill_step_size, prompt_cache=cache,
                                 context_ids=prompt_ids[:-1],
                                 extra_processors=plan.processors(params.max_tokens))
            markup = MarkupFilter(in_think, markup=plan.mode != "structured")
            for chunk in tokens:
                for kind, text in markup.feed(chunk.text):
                    yield Chunk(text, chunk.token_ids, kind)
            for kind, text in markup.feed("", final=True):
                yield Chunk(text, [], kind)
            stats = finish_stats(self._stats_since(before), tokens)
            stats.steps = list(steps)
            stats.prompt_tokens = len(prompt_ids)
            stats.prompt_cached_tokens = reused
            stats.prompt_seconds += prefill_seconds
            stats.compute_seconds += prefill_seconds
            self.stats.add(stats)
            done = plan.finish(tokens.text, tokens.finish_reason, in_think)
            yield GenerationResult(
                text=done.content,
                raw_text=tokens.text,
                token_ids=tokens.token_ids,
                prompt_token_ids=prompt_ids,
                finish_reason=done.finish_reason,
                stats=stats,
                reasoning=done.reasoning,
                tool_calls=done.tool_calls,
                invalid_tool_calls=done.invalid_tool_calls,
                parsed=done.parsed,
            )

    def astream(self, prompt: Prompt, **kwargs) -> AsyncIterator[Chunk | GenerationResult]:
        """``stream`` for asyncio: the generation runs in a worker thread, the event loop never
        waits on it; same arguments and items."""
        return iterate_in_thread(lambda: self.stream(prompt, **kwargs))

    def generate(self, prompt: Prompt, **kwargs) -> GenerationResult:
        """Generate to completion; same arguments as ``stream``."""
        for item in self.stream(prompt, **kwargs):
            if isinstance(item, GenerationResult):
                return item
        raise RuntimeError("generation ended without a result")  # pragma: no cover

    def _prefill(self, prompt_ids: list[int], boundaries: list[int]) -> tuple[list, int]:
        """Process all but the last prompt token, reusing and saving prefix snapshots.

        Returns the model cache and how many prompt tokens a snapshot already covered.
        """
        cache, done = self.prompt_cache.restore(self.model, prompt_ids)
        reused = done
        for end in sorted({b for b in boundaries if b > done} | {len(prompt_ids) - 1}):
            if end > done:
                prefill(self.model, prompt_ids[done:end], cache, self.prefill_step_size)
                self.prompt_cache.save(prompt_ids[:end], cache)
                done = end
        return cache, reused

    @property
    def cache_gb(self) -> float:
        """The expert cache's budget in GiB."""
        return self.streamer.cache.budget_bytes / GB

    @property
    def context_window(self) -> int | None:
        """The model's maximum positions (``max_position_embeddings``), if the config says."""
        return self.config.get("text_config", self.config).get("max_position_embeddings")

    # -- statistics ------------------------------------------------------------------------

    def _counters(self) -> tuple[CacheCounters, StreamCounters]:
        cache = self.streamer.cache
        cache.counters.bytes_peak = cache.counters.bytes  # peak of this generation from here
        return copy.copy(cache.counters), copy.deepcopy(self.streamer.counters)

    def _stats_since(self, before: tuple[CacheCounters, StreamCounters]) -> Stats:
        cache0, stream0 = before
        cache, stream = self.streamer.cache.counters, self.streamer.counters

        def per_layer(name: str) -> list[int]:
            now, then = getattr(stream, name), getattr(stream0, name)
            return [n - (then[i] if i < len(then) else 0) for i, n in enumerate(now)]

        return Stats(
            hits=cache.hits - cache0.hits,
            misses=cache.misses - cache0.misses,
            bytes_read=stream.bytes_read - stream0.bytes_read,
            io_seconds=stream.io_seconds - stream0.io_seconds,
            cache_bytes=cache.bytes,
            cache_bytes_peak=cache.bytes_peak,
            layer_hits=per_layer("layer_hits"),
            layer_misses=per_layer("layer_misses"),
            layer_bytes_read=per_layer("layer_bytes_read"),
        )

    def close(self) -> None:
        """Release the expert files and reader threads."""
        self.streamer.reader.close()


def _params(kwargs: dict) -> GenerationParams:
    unknown = set(kwargs) - _PARAM_NAMES
    if unknown:
        raise TypeError(f"unknown generation argument(s): {', '.join(sorted(unknown))}")
    return GenerationParams(**kwargs)
