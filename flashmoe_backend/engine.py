"""``FlashMoE``: load a store into an mlx-lm model whose experts stream from disk, and generate.

``engine.model`` is the mlx-lm model of the store's architecture with every ``SwitchGLU``
replaced by a ``StreamingSwitch``; ``engine.tokenizer`` is mlx-lm's ``TokenizerWrapper``. Both
work with mlx-lm's and Outlines' own generation code unchanged.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import threading
import time
import warnings
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, get_args

import mlx.core as mx
from flashmoe_kernels import install_fast_gated_delta
from mlx_lm.utils import _get_classes, load_model, load_tokenizer

from flashmoe_backend.constrained.constraint import check_response_format
from flashmoe_backend.distributed import (
    DEFAULT_SPLIT,
    DEFAULT_TIMEOUT_S,
    SPLITS,
    DistributedStats,
    ExpertGroup,
    detect_group,
)
from flashmoe_backend.errors import (
    CacheBudgetWarning,
    DistributedError,
    InvalidRequestError,
    ParameterError,
    ToolError,
    UnknownArgumentError,
)
from flashmoe_backend.experts.cache import DEFAULT_POLICY, CacheCounters, ExpertCache, Policy
from flashmoe_backend.experts.reader import ExpertReader, PageCache, ReaderConfig, Verify
from flashmoe_backend.experts.switch import (
    ExpertStreamer,
    StreamCounters,
    StreamingSwitch,
    install_streaming,
)
from flashmoe_backend.generation.aio import iterate_in_thread
from flashmoe_backend.generation.loop import TokenStream, encode_prompt, finish_stats
from flashmoe_backend.generation.params import (
    Chunk,
    GenerationDefaults,
    GenerationParams,
    GenerationResult,
    Prompt,
    generation_params,
    read_generation_defaults,
)
from flashmoe_backend.generation.prompt_cache import (
    PromptCache,
    message_boundaries,
    prefill,
    shared_prefix_end,
)
from flashmoe_backend.generation.prompt_files import PromptCacheDir, store_identity
from flashmoe_backend.generation.stats import Stats
from flashmoe_backend.output import MarkupFilter, OutputPlan, prompt_in_think
from flashmoe_backend.store.format import Manifest, StoreError
from flashmoe_backend.store.layout import ExpertSource
from flashmoe_backend.store.source import find_source, open_source
from flashmoe_backend.tools.calls import ToolSpec, normalize_tool_choice, normalize_tools
from flashmoe_backend.validation import (
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_prompt,
    check_tools_argument,
    reply_budget,
)

GB = 1024**3
MiB = 1024**2


def check_load_options(
    cache_gb: Any,
    experts_per_token: Any,
    io_threads: Any,
    page_cache: Any,
    verify: Any,
    policy: Any,
    prefill_step_size: Any,
    prompt_cache_entries: Any,
    prompt_cache_dir: Any = None,
    group: Any = "auto",
    expert_split: Any = DEFAULT_SPLIT,
    distributed_timeout: Any = DEFAULT_TIMEOUT_S,
) -> None:
    """``FlashMoE.load``'s options, checked before anything is read (``ParameterError``)."""
    check_number("cache_gb", cache_gb, 0.0, low_open=True)
    check_int("experts_per_token", experts_per_token, 1, none_means="the model's own routing")
    check_int("io_threads", io_threads, 1)
    check_choice("page_cache", page_cache, get_args(PageCache))
    check_choice("verify", verify, get_args(Verify))
    check_choice("policy", policy, get_args(Policy))
    check_int("prefill_step_size", prefill_step_size, 1)
    check_int("prompt_cache_entries", prompt_cache_entries, 0)
    if prompt_cache_dir is not None and (
        not isinstance(prompt_cache_dir, (str, os.PathLike)) or not os.fspath(prompt_cache_dir)
    ):
        raise ParameterError(
            f"prompt_cache_dir must be a directory path or None, got {prompt_cache_dir!r}"
        )
    if not (group is None or (isinstance(group, str) and group == "auto")
            or isinstance(group, mx.distributed.Group)):
        raise ParameterError(f"group must be 'auto', None or an mx.distributed.Group, got {group!r}")
    check_choice("expert_split", expert_split, SPLITS)
    check_number("distributed_timeout", distributed_timeout, 0.0, low_open=True)


#: ``FlashMoE.load``'s options (every argument but the store), as ``check_load_options`` takes them.
LOAD_OPTIONS: tuple[str, ...] = tuple(inspect.signature(check_load_options).parameters)


def check_load_keywords(names: Iterable[str]) -> None:
    """Refuse keyword arguments ``FlashMoE.load`` does not take (``UnknownArgumentError``, a
    ``TypeError``), naming them and the options it does take."""
    unknown = sorted(set(names) - set(LOAD_OPTIONS))
    if unknown:
        raise UnknownArgumentError(
            f"unknown load argument(s): {', '.join(unknown)}; expected {', '.join(LOAD_OPTIONS)}"
        )


def experts_per_token_of(config: dict) -> int | None:
    """The model's own number of experts per token (K), if its config says."""
    return config.get("text_config", config).get("num_experts_per_tok")


def gib_at_least(nbytes: int) -> str:
    """``nbytes`` in GiB, rounded up to 3 significant digits: a ``cache_gb`` that surely holds it."""
    gib = nbytes / GB
    digits = max(2 - math.floor(math.log10(gib)), 0)
    return f"{math.ceil(gib * 10**digits) / 10**digits:.{digits}f}"


def check_cache_budget(budget_bytes: int, manifest: Manifest, experts_per_token: int | None) -> None:
    """Refuse a budget below one expert record; warn (``CacheBudgetWarning``) when it cannot hold
    one token's experts of a layer: then every token reads its experts from disk again."""
    record = max(layer.record_bytes for layer in manifest.layers)
    if budget_bytes < record:
        raise ParameterError(
            f"cache budget of {budget_bytes} bytes cannot hold one expert record "
            f"({record} bytes); raise cache_gb to at least {gib_at_least(record)}"
        )
    needed = (experts_per_token or 1) * record
    if budget_bytes < needed:
        warnings.warn(
            f"expert cache budget of {budget_bytes / MiB:.2f} MiB cannot hold one token's experts of a "
            f"layer ({experts_per_token} experts x {record / MiB:.2f} MiB = {needed / MiB:.2f} MiB): "
            "experts are evicted before they are used again and nearly every read misses; raise "
            f"cache_gb to at least {gib_at_least(needed)}",
            CacheBudgetWarning,
            stacklevel=3,
        )


def _with_top_k(config: dict, k: int | None) -> dict:
    """Config overrides that set the number of experts per token (K) where the model reads it."""
    if k is None:
        return {}
    text = config.get("text_config", config)
    num_experts = text.get("num_experts", text.get("num_local_experts"))
    if num_experts is not None and k > num_experts:
        raise ParameterError(f"experts_per_token is {k} but the model has {num_experts} experts per layer")
    if "text_config" in config:
        text = copy.deepcopy(config["text_config"])
        text["num_experts_per_tok"] = k
        return {"text_config": text}
    return {"num_experts_per_tok": k}


class FlashMoE:
    """A streaming-experts MoE engine. Create it with ``FlashMoE.load(store_dir, ...)``, or share
    one per (store, load options) with ``FlashMoE.shared(store_dir, ...)``."""

    #: ``shared``'s engines, by (resolved store directory, every load option); guarded by the lock.
    _shared_engines: ClassVar[dict[tuple, FlashMoE]] = {}
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        store: Path,
        model,
        tokenizer,
        config: dict,
        manifest: Manifest,
        streamer: ExpertStreamer,
        prefill_step_size: int,
        prompt_cache_entries: int,
        defaults: GenerationDefaults | None = None,
        prompt_files: PromptCacheDir | None = None,
        source: ExpertSource | None = None,
    ):
        #: the directory the model was loaded from: a store, or a checkpoint read in place
        self.store = store
        #: where the experts come from (``store/layout.py``): a packed store or a checkpoint
        self.source = source
        #: the store's generation defaults (its generation_config.json); a caller's values win.
        self.defaults = defaults or GenerationDefaults()
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.manifest = manifest
        self.streamer = streamer
        self.prefill_step_size = prefill_step_size
        self.prompt_cache = PromptCache(prompt_cache_entries)
        #: prefix snapshots on disk (``prompt_cache_dir``), shared with later processes; or None
        self.prompt_files = prompt_files
        self.stats = Stats()
        self.lock = threading.Lock()  # one generation at a time: the model and cache are shared
        #: this rank's share of a group of ranks running the model (``distributed.py``), or None
        self.distributed: ExpertGroup | None = None
        #: every rank's counters over the last generation, when ``distributed`` is set
        self.distributed_stats: DistributedStats | None = None

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
        prompt_cache_dir: str | os.PathLike | None = None,
        group: Any = "auto",
        expert_split: str = DEFAULT_SPLIT,
        distributed_timeout: float = DEFAULT_TIMEOUT_S,
        **unknown: Any,
    ) -> FlashMoE:
        """Load a model: a store made by ``flashmoe pack``, or a checkpoint read in place.

        Args:
            store: a store directory; an mlx-community checkpoint directory (experts stacked
                under ``switch_mlp``), read in place: no pack, no copy; a Hugging Face repo id
                ``org/name`` already in the local Hugging Face cache (``HF_HOME`` /
                ``HF_HUB_CACHE``; nothing is downloaded: ``flashmoe download org/name`` does
                that); or ``"demo"``.
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
            prompt_cache_dir: a directory (created if missing) where the snapshot of a chat's
                system prompt and tool list is also saved, in mlx-lm's prompt-cache format, and
                looked for when no snapshot in memory covers it: a later process (a restarted
                server) then does not prefill that prefix again. Files of another store or
                load option, and damaged ones, are ignored with a ``PromptCacheWarning``.
            group: run one model over several ranks (expert parallelism, see
                ``flashmoe_backend/distributed.py``): ``"auto"`` takes the group ``mlx.launch``
                started, if it has more than one rank; ``None`` runs in this process alone; or
                an ``mx.distributed.Group``. Each rank reads and caches only its share of every
                layer's experts (its own ``cache_gb``); rank 0 generates as usual, the other
                ranks call ``follow()``. Every rank must load the same model and options.
            expert_split: which rank owns an expert: ``"interleaved"`` (expert e on rank
                e % N) or ``"blocks"`` (contiguous ranges).
            distributed_timeout: seconds a rank waits for the others in one exchange before it
                raises ``DistributedError`` (a rank died, hangs, or is unreachable).

        The store's ``generation_config.json`` gives the generation defaults (sampling, and
        ``chat_template_kwargs`` such as ``{"enable_thinking": false}``; see
        ``GenerationDefaults``). Raises ``StoreNotFoundError`` (a ``FileNotFoundError``) when there
        is no store or checkpoint at ``store`` (or the repo is not cached), ``StoreError`` naming
        the file when it is damaged (a truncated shard, a header that disagrees with config.json,
        a missing tensor: all before any token; an expert slice that changed since its first
        read, when it is read), ``ParameterError`` for a bad
        option, ``UnknownArgumentError`` (a ``TypeError``) for a keyword it does not take; warns
        (``CacheBudgetWarning``) when the cache cannot hold one token's experts.
        """
        check_load_keywords(unknown)
        check_load_options(
            cache_gb,
            experts_per_token,
            io_threads,
            page_cache,
            verify,
            policy,
            prefill_step_size,
            prompt_cache_entries,
            prompt_cache_dir,
            group,
            expert_split,
            distributed_timeout,
        )
        group = detect_group(group)
        source = open_source(store)
        store, manifest, config = source.root, source.manifest, source.config
        defaults = read_generation_defaults(store)
        top_k = _with_top_k(config, experts_per_token)
        budget = int(cache_gb * GB)
        check_cache_budget(budget, manifest, experts_per_token or experts_per_token_of(config))
        install_fast_gated_delta()  # mlx-lm's fast GatedDeltaNet path is Metal-only
        cache = ExpertCache(budget, policy=policy)
        reader = ExpertReader(source, config=ReaderConfig(io_threads, page_cache, verify))
        streamer = ExpertStreamer(manifest, reader, cache)
        shard = None
        if group is not None:
            text_config = config.get("text_config", config)
            shard = streamer.shard = ExpertGroup(
                group,
                streamer,
                split=expert_split,
                timeout_s=distributed_timeout,
                width=text_config["hidden_size"],
                k=experts_per_token or experts_per_token_of(config) or 1,
            )
        # The ranks other than 0 only compute experts: their resident weights stay unread.
        follower = shard is not None and not shard.is_leader
        # The experts stream from the source; a checkpoint read in place also holds them in its
        # shards, and mlx-lm must neither load them nor expect parameters for them.
        expert_modules = {layer.module for layer in manifest.layers}

        def streaming_classes(config: dict):
            model_class, args_class = _get_classes(config)

            class StreamingModel(model_class):
                def __init__(self, args):
                    super().__init__(args)
                    install_streaming(self, manifest, streamer)

                def sanitize(self, weights):
                    if hasattr(super(), "sanitize"):
                        weights = super().sanitize(weights)
                    return {k: v for k, v in weights.items() if k.rsplit(".", 2)[0] not in expert_modules}

            StreamingModel.__name__ = model_class.__name__
            return StreamingModel, args_class

        try:
            model, config = load_model(
                store,
                lazy=follower,
                strict=True,
                get_model_classes=streaming_classes,
                model_config=top_k,
            )
        except (ValueError, KeyError) as e:
            if isinstance(e, StoreError):
                raise
            raise StoreError(f"{store}: resident weights do not fit the model: {e}") from e
        try:
            tokenizer = load_tokenizer(store)
        except Exception as e:
            raise StoreError(f"{store}: cannot load the tokenizer: {e}") from e
        prompt_files = None
        if prompt_cache_dir is not None and not follower:
            try:
                identity = store_identity(store, config, source.fingerprint())
                prompt_files = PromptCacheDir(prompt_cache_dir, identity)
            except OSError as e:
                raise ParameterError(f"prompt_cache_dir {os.fspath(prompt_cache_dir)!r}: {e}") from e
        engine = cls(
            store,
            model,
            tokenizer,
            config,
            manifest,
            streamer,
            prefill_step_size,
            prompt_cache_entries,
            defaults,
            prompt_files,
            source,
        )
        if shard is not None:
            # Before the first layer call: every rank must serve the same experts and k.
            shard.handshake(
                source.fingerprint() + repr((sorted(config.items()), expert_split, top_k)).encode()
            )
            engine.distributed = shard
        return engine

    @classmethod
    def shared(cls, store: str | Path, *args: Any, **load_options: Any) -> FlashMoE:
        """The one engine of ``store`` with these load options (``load``'s arguments), loaded on
        first use and handed to every later caller: front ends share engines this way.

        The key is the directory the store resolves to (``find_source``: a relative path, a
        symlink, the absolute path and a repo id's cached snapshot are one store) and every load
        option, defaults filled in (``shared(s)`` and ``shared(s, cache_gb=4.0)`` are one engine).
        An engine serialises its own generations (``self.lock``), so it can be used from several
        threads at once. The
        errors are ``load``'s: ``StoreNotFoundError``, ``StoreError``, ``ParameterError``, and
        ``UnknownArgumentError`` (a ``TypeError``) for an option ``load`` does not take.
        """
        check_load_keywords(load_options)
        path = find_source(store)
        bound = inspect.signature(cls.load).bind(path, *args, **load_options)
        bound.apply_defaults()
        options = {k: v for k, v in bound.arguments.items() if k not in ("store", "unknown")}
        check_load_options(**options)  # a bad option is refused before it is used as a key
        key = (str(path.resolve()), *sorted(options.items()))
        with cls._shared_lock:
            engine = cls._shared_engines.get(key)
            if engine is None:
                engine = cls._shared_engines[key] = cls.load(path, **options)
        return engine

    @classmethod
    def release_shared(cls) -> None:
        """Close and forget every engine of ``shared`` (each after the generation it is running,
        if any); the next ``shared`` call loads again. Objects still holding a released engine
        cannot generate any more."""
        with cls._shared_lock:
            engines = list(cls._shared_engines.values())
            cls._shared_engines.clear()
        for engine in engines:
            with engine.lock:
                engine.close()

    # -- generation ------------------------------------------------------------------------

    def encode(
        self, prompt: Prompt, tools: Sequence[dict] | None = None, enable_thinking: bool | None = None
    ) -> list[int]:
        """Token ids of a prompt (string, token ids, or chat messages), as ``stream`` renders it:
        with the store's chat template kwargs, ``enable_thinking`` overriding theirs."""
        return self._encode(check_prompt(prompt, self.vocab_size), tools, enable_thinking)

    def _encode(
        self, prompt: Prompt, tools: Sequence[dict] | None, enable_thinking: bool | None
    ) -> list[int]:
        return encode_prompt(
            self.tokenizer,
            prompt,
            tools=tools,
            enable_thinking=enable_thinking,
            template_kwargs=self.defaults.chat_template_kwargs,
        )

    def generation_params(self, **kwargs: Any) -> GenerationParams:
        """The parameters a call with these keyword arguments runs with: the store's defaults,
        overridden by ``kwargs``. Raises ``UnknownArgumentError`` (a ``TypeError``) or
        ``ParameterError`` (a ``ValueError``): integrations call it to check their settings."""
        return generation_params(self.defaults.params, kwargs)

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
                A message is ``{"role": "system" | "user" | "assistant" | "tool", "content": ...}``
                with string content or a list of ``{"type": "text", "text": ...}`` parts; an
                assistant message may carry ``tool_calls`` and ``reasoning_content``.
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
                repetition_penalty, seed, stop, logits_processors, enable_thinking); those not
                given come from the store's defaults (``self.defaults``), then
                ``GenerationParams``' own. ``max_tokens=None`` generates up to the end of the
                context window. Constrained output turns thinking off unless
                ``enable_thinking=True`` is passed.

        Everything is checked here, at the call, before anything is generated: a bad prompt
        raises ``PromptError``, bad tools or tool choice ``ToolError``, a bad response format
        ``ResponseFormatError``, a bad value ``ParameterError``, an unknown keyword
        ``UnknownArgumentError`` (also a ``TypeError``), and a prompt plus ``max_tokens`` beyond
        the context window ``ContextWindowError``: all ``InvalidRequestError``s, ``ValueError``s.
        """
        if self.distributed is not None and not self.distributed.is_leader:
            raise DistributedError(
                f"generation runs on rank 0; rank {self.distributed.rank} serves its experts "
                "with engine.follow()"
            )
        params = self.generation_params(**kwargs)
        check_bool("parallel_tool_calls", parallel_tool_calls)
        prompt = check_prompt(prompt, self.vocab_size)
        specs, choice = check_tools(tools, tool_choice)
        if response_format is not None:
            check_response_format(response_format)
        if params.enable_thinking is None and (
            response_format is not None or choice in ("required", "named")
        ):
            params.enable_thinking = False
        rendered = [s.to_openai() for s in specs] if specs and choice != "none" else None
        prompt_ids = self._encode(prompt, rendered, params.enable_thinking)
        params.max_tokens = reply_budget(len(prompt_ids), params.max_tokens, self.context_window)
        in_think = prompt_in_think(self.tokenizer, prompt_ids)
        try:
            plan = OutputPlan.build(
                self.tokenizer,
                tools=specs,
                tool_choice=tool_choice,
                parallel_tool_calls=parallel_tool_calls,
                response_format=response_format,
                in_think=in_think,
            )
        except InvalidRequestError:
            raise
        except ValueError as e:  # what only the combination shows (a format with forced calls)
            raise InvalidRequestError(str(e)) from e
        is_chat = bool(prompt) and isinstance(prompt[0], dict)
        boundaries = message_boundaries(self.tokenizer, prompt, prompt_ids, rendered) if is_chat else []
        shared = None
        if is_chat and self.prompt_files is not None:
            shared = shared_prefix_end(self.tokenizer, prompt, prompt_ids, rendered)
        return self._run(prompt_ids, boundaries, params, plan, in_think, shared)

    def _run(
        self,
        prompt_ids: list[int],
        boundaries: list[int],
        params: GenerationParams,
        plan: OutputPlan,
        in_think: bool,
        shared: int | None = None,
    ) -> Iterator[Chunk | GenerationResult]:
        with self.lock, self.streamer.record_steps() as steps:
            before = self._counters()
            tic = time.perf_counter()
            cache, reused = self._prefill(prompt_ids, boundaries, shared)
            prefill_seconds = time.perf_counter() - tic
            tokens = TokenStream(
                self.model,
                self.tokenizer,
                prompt_ids[-1:],
                params,
                self.prefill_step_size,
                prompt_cache=cache,
                context_ids=prompt_ids[:-1],
                extra_processors=plan.processors(params.max_tokens),
            )
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
            if self.distributed is not None:
                self.distributed_stats = self.distributed.gather_stats(stats.generated_tokens)
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

    def _prefill(
        self, prompt_ids: list[int], boundaries: list[int], shared: int | None = None
    ) -> tuple[list, int]:
        """Process all but the last prompt token, reusing and saving prefix snapshots: those in
        memory, and the one of the ``shared`` prefix (system prompt and tools) on disk, when
        ``prompt_cache_dir`` is set.

        Returns the model cache and how many prompt tokens a snapshot already covered.
        """
        cache, done = self.prompt_cache.restore(self.model, prompt_ids)
        if shared is not None and done < shared:
            # Memory first: a file is only read when no snapshot in memory covers the prefix
            # (a new process, or one evicted), and is then kept in memory for the next request.
            loaded = self.prompt_files.load(self.model, prompt_ids[:shared])
            if loaded is not None:
                cache, done = loaded, shared
                self.prompt_cache.save(prompt_ids[:shared], cache)
            else:
                boundaries = [*boundaries, shared]  # prefill stops there to write the file
        reused = done
        for end in sorted({b for b in boundaries if b > done} | {len(prompt_ids) - 1}):
            if end > done:
                prefill(self.model, prompt_ids[done:end], cache, self.prefill_step_size)
                self.prompt_cache.save(prompt_ids[:end], cache)
                if end == shared:
                    self.prompt_files.save(prompt_ids[:end], cache)
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

    @property
    def vocab_size(self) -> int | None:
        """Rows of the model's embedding: token ids must be below it."""
        return self.config.get("text_config", self.config).get("vocab_size")

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

    def follow(self) -> None:
        """On a rank other than 0 of a group (``load``'s ``group``): compute this rank's experts
        for rank 0's layer calls until rank 0 closes its engine or exits. Raises
        ``DistributedError`` when rank 0 goes away without closing, or on rank 0."""
        if self.distributed is None:
            raise DistributedError("follow() needs a group of ranks (run under mlx.launch)")
        switches = [m for _, m in self.model.named_modules() if isinstance(m, StreamingSwitch)]
        with self.lock:
            self.distributed.follow(switches)

    def close(self) -> None:
        """Release the expert files and reader threads; on rank 0 of a group, also tell the
        other ranks to stop following."""
        if self.distributed is not None:
            self.distributed.close()
        self.streamer.reader.close()


def check_tools(tools: Any, tool_choice: Any = None) -> tuple[list[ToolSpec], str]:
    """Validated tool specs and the tool-choice mode (``"none"``, ``"auto"``, ``"required"`` or
    ``"named"``), as ``FlashMoE.stream`` checks them; any problem is a ``ToolError`` naming the
    tool and what is wrong with it."""
    try:
        specs = normalize_tools(check_tools_argument(tools))
        choice, _ = normalize_tool_choice(tool_choice, specs)
    except ToolError:
        raise
    except ValueError as e:  # tool_specs' checks name the tool and the problem
        raise ToolError(str(e)) from e
    return specs, choice
