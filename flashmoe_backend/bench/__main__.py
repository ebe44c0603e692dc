"""``python -m flashmoe_backend.bench synthetic|model ...``"""

import sys

from .cli import main

sys.exit(main())
