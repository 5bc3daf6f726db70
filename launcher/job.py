"""The Ray job entry point, kept for `python -m launcher.job` from the repository root: it is `lopt-train`.

    ray job submit --address http://HEAD:8265 --working-dir . -- lopt-train configs/cluster_zero3.yaml
    lopt-train configs/default.yaml          # no cluster: starts an embedded local Ray

Under `ray job submit` Ray sets RAY_ADDRESS for the entry point, so the run attaches to that cluster (it says so
in its log); without it, the run starts its own local instance. See the README's "On a Ray cluster".
"""

from __future__ import annotations

import sys

from lopt_dist.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
