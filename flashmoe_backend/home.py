"""flashmoe's own small directory: ``$FLASHMOE_HOME``, else the platform's cache directory.

What lives there is small and can be deleted at any time, at the cost of work redone: the index
of each checkpoint read in place, with the CRC32s of its expert slices recorded on their first
read (``store/checkpoint.py``). Nothing is ever written inside a checkpoint or a Hugging Face
snapshot.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "FLASHMOE_HOME"


def flashmoe_home() -> Path:
    """``$FLASHMOE_HOME`` if set, else the user cache directory for "flashmoe" (platformdirs:
    ``~/.cache/flashmoe`` on Linux, honouring ``XDG_CACHE_HOME``; ``~/Library/Caches/flashmoe`` on
    macOS). Not created here."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("flashmoe", appauthor=False))
