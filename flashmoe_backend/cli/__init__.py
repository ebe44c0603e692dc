"""The ``flashmoe`` command: ``commands`` (argument parsing and the subcommands), ``console``
(printing streams and statistics) and ``demo`` (the embedded model's walk-through)."""

from flashmoe_backend.cli.commands import main

__all__ = ["main"]
