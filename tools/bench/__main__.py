"""`python -m tools.bench`, the same as the `lopt-bench` console script."""

import sys

from .cli import main

sys.exit(main())
