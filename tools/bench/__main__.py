"""`python -m tools.bench`, the same as the `lopt-bench` console script."""

import sys

from tools.bench.cli import main

sys.exit(main())
