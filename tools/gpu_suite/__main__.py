"""`python -m tools.gpu_suite`."""

import sys

from .cli import main

sys.exit(main())
