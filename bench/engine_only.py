"""Import this first in a bench script that runs on the GPU machine: it puts the repository root
on ``sys.path`` and lets ``flashmoe_backend``'s engine modules import without the package's
``__init__``, which also imports the generation and structured-output stack (outlines, ...) that
the GPU image lacks. Where the package is already imported (tests), it changes nothing.
"""

import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if "flashmoe_backend" not in sys.modules:
    package = types.ModuleType("flashmoe_backend")
    package.__path__ = [str(ROOT / "flashmoe_backend")]
    sys.modules["flashmoe_backend"] = package
