"""``python -m flashmoe_backend.bench synthetic|model ...``"""

import sys

from flashmoe_backend.bench.cli import main

sys.exit(main())
