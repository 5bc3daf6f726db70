"""`python -m tools.bench.memory`, the same as the `lopt-bench-memory` console script."""

import sys

from tools.bench.memory.cli import main

sys.exit(main())
