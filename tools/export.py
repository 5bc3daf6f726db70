"""`python -m tools.export`: kept for old command lines; `lopt-export` lives in lopt_dist.checkpoint."""

from __future__ import annotations

import sys

from lopt_dist.checkpoint.export_checkpoint import export_checkpoint, main

__all__ = ["export_checkpoint", "main"]

if __name__ == "__main__":
    sys.exit(main())
