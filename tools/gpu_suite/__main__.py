"""`python -m tools.gpu_suite`."""

import sys

from tools.gpu_suite.cli import main

sys.exit(main())
