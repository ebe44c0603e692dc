"""Hugging Face repo ids as model sources, through ``huggingface_hub`` (never hand-made cache paths).

* ``cached_snapshot("org/name")``: the snapshot directory of a repo in the local Hugging Face
  cache (``HF_HOME`` / ``HF_HUB_CACHE`` as huggingface_hub reads them), found with
  ``snapshot_download(..., local_files_only=True)``: nothing is downloaded, ever. A repo that is
  not cached is a ``StoreNotFoundError`` saying how to download it.
* ``download("org/name")``: huggingface_hub's resumable download with its progress bars; only
  ``flashmoe download REPO`` and ``--download`` call it: 209 GB never start silently.
* ``blob_sha256(path)``: the sha256 a cached file's blob is named by (large files are stored by
  Git LFS under their sha256), which ``flashmoe verify`` checks the file against.

huggingface_hub is imported only when a repo id is resolved: ``flashmoe info STORE`` does not
pay for it.
"""

from __future__ import annotations

import re
from pathlib import Path

from flashmoe_backend.errors import StoreNotFoundError
from flashmoe_backend.store.format import StoreError

#: What a checkpoint needs (mlx-lm's own download patterns, less its custom-code ``*.py``).
ALLOW_PATTERNS = [
    "*.json",
    "model*.safetensors",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jsonl",
    "*.jinja",
]
# "org/name": exactly one slash. A single name is a valid repo id on the Hub too, but taking one
# for a repo would turn every mistyped store directory into a cache lookup.
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_repo_id(text: object) -> bool:
    """Whether ``text`` reads as a Hugging Face repo id ``org/name`` (not a path: no leading
    ``.``, ``/`` or ``~``, exactly one slash)."""
    return isinstance(text, str) and _REPO_ID.fullmatch(text) is not None and ".." not in text


def _download_hint(repo: str) -> str:
    return f"download it with `flashmoe download {repo}` (or pass --download)"


def cached_snapshot(repo: str, revision: str | None = None) -> Path:
    """The local snapshot directory of ``repo`` in the Hugging Face cache, without any network
    access; ``StoreNotFoundError`` naming the cache when it is not there, ``StoreError`` when the
    cached snapshot is incomplete (an interrupted download)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                repo, revision=revision, local_files_only=True, allow_patterns=ALLOW_PATTERNS
            )
        )
    except LocalEntryNotFoundError:
        raise StoreNotFoundError(
            f"{repo}: no such store or checkpoint directory, and not in the local Hugging Face "
            f"cache ({constants.HF_HUB_CACHE}); {_download_hint(repo)}"
        ) from None
    except IncompleteSnapshotError as e:
        raise StoreError(f"{repo}: the cached download is incomplete ({e}); {_download_hint(repo)}") from e
    except HFValidationError as e:
        raise StoreNotFoundError(f"{repo}: not a store directory, and not a valid repo id ({e})") from e


def download(repo: str, revision: str | None = None) -> Path:
    """Download (or complete) ``repo``'s checkpoint files into the Hugging Face cache with
    huggingface_hub (resumable, with progress bars); returns the snapshot directory. Errors that
    say what to do (repo not found, gated, offline) are ``StoreError``s naming the repo."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except GatedRepoError as e:
        raise StoreError(
            f"{repo}: a gated repo: accept its terms on huggingface.co and log in "
            f"(`hf auth login`) first"
        ) from e
    except RepositoryNotFoundError as e:
        raise StoreError(f"{repo}: no such repo on the Hugging Face Hub (or it is private)") from e
    except RevisionNotFoundError as e:
        raise StoreError(f"{repo}: no revision {revision!r}") from e
    except LocalEntryNotFoundError as e:  # offline (HF_HUB_OFFLINE=1) or no connection
        raise StoreError(f"{repo}: cannot download: {e}") from e
    except HFValidationError as e:
        raise StoreError(f"{repo}: not a valid repo id ({e})") from e


def blob_sha256(path: Path) -> str | None:
    """The sha256 the Hugging Face cache names ``path``'s blob by, or None: files of a cached
    snapshot are links to blobs, and a Git LFS file's blob is named by its content's sha256
    (small files kept in git are named by their git hash, 40 digits: no sha256 there)."""
    path = Path(path)
    if not path.is_symlink():
        return None
    name = path.resolve().name
    return name if _SHA256.fullmatch(name) else None
