"""``flashmoe bench``: decode and prefill against the physical floor, on a synthetic store or a
real one.

Two modes:

* ``synthetic``: a store with Qwen3.5-397B-sized expert records (random bytes, real checksums,
  written through the project's store format) driven by a routing trace calibrated to published
  Qwen3.5-397B statistics (``trace``). The trace drives the REAL reader and cache exactly as
  decode does (per layer: look up, pin, read all misses at once through
  ``ExpertStreamer.fetch``), without the model's compute; a stand-in for the expert compute
  reads every needed record once from memory (``--touch``). Experiments: cache policies against
  Belady's optimum, our cache versus the OS page cache, an mmap page-fault baseline (how
  llama.cpp reads a model larger than memory), K=4 versus K=10, next-layer prefetch with a
  modelled recall, and layer-major prefill against one pass over the experts it needs.
* ``model``: ``FlashMoE.generate`` on a real store; the same numbers from ``engine.stats`` and the
  streamer's counters, Belady for the recorded accesses, K=4, and mlx-lm with the whole model in
  memory when it fits.

Both bandwidths of the floor are measured in the same run on the store's own files: the disk
with O_DIRECT reads of whole records in batches like a layer's misses, the memory with the
compute stand-in over records held in MLX arrays::

    floor per token = missed bytes / disk bandwidth + (resident + hit bytes) / memory bandwidth

The report is JSON (``--out``) and markdown (``--markdown``).

Modules, roughly in the order a run uses them:

* ``cli``: the command line; ``config``: what a run can be told (one dataclass per mode);
  ``shapes``: Qwen3.5-397B's shapes (and tiny ones), the one definition every benchmark uses;
* ``synthetic_store``: the synthetic store; ``pagecache``: cold starts, residency, a page-cache
  budget; ``bandwidth``: the disk and memory bandwidths and the floor;
* ``trace``: the routing-trace generator, its statistics and Belady's optimum;
* ``policies``: cache policies against Belady (no I/O); ``replay``: trace-driven decode and
  prefill through the real reader and cache; ``peers``: the mmap page-fault baseline;
* ``experiments``: the synthetic mode's decode runs; ``synthetic``: the synthetic mode;
  ``model``: the real-model mode; ``router_recall``: how well a real model's next-layer experts
  can be predicted (the recall the prefetch runs model; ``bench/prefetch_recall.py``);
* ``verdicts``: targets, decisions and invariants; ``report``: markdown, and writing the report.
"""

from flashmoe_backend.bench.cli import add_arguments, main, run
from flashmoe_backend.bench.config import ModelConfig, SyntheticConfig
from flashmoe_backend.bench.model import run_model
from flashmoe_backend.bench.report import to_markdown
from flashmoe_backend.bench.synthetic import run_synthetic
from flashmoe_backend.bench.verdicts import TARGETS

__all__ = [
    "TARGETS",
    "ModelConfig",
    "SyntheticConfig",
    "add_arguments",
    "main",
    "run",
    "run_model",
    "run_synthetic",
    "to_markdown",
]
