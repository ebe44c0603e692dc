"""Units and the progress log shared by the benchmark's modules."""

from __future__ import annotations

import sys
import time

GiB = 1024**3
MiB = 1024**2


def log(msg: str) -> None:
    """A progress line on stderr (the report itself goes to files or stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
