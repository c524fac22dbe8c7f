"""``python -m coe_core.cli``: the ``coe`` command without its console script."""

import os
import sys

from coe_core.cli import main

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
