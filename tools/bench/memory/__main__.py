"""`python -m tools.bench.memory`, the same as the `lopt-bench-memory` console script."""

import sys

from .cli import main

sys.exit(main())
