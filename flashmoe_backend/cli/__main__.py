"""``python -m flashmoe_backend.cli``: the ``flashmoe`` command."""

import sys

from flashmoe_backend.cli.commands import main

sys.exit(main())
