"""The Ray job entry point, unchanged on a laptop and on a cluster.

    ray job submit --address http://HEAD:8265 --working-dir . -- python -m launcher.job configs/gsm8k.yaml
    python -m launcher.job configs/default.yaml          # no cluster: starts an embedded local Ray

Under `ray job submit` Ray sets RAY_ADDRESS for the entry point, so the run attaches to that cluster and its
workers see the uploaded working directory; without it, the run starts its own local instance.
"""

from __future__ import annotations

import os
import sys

from lopt_dist.cli import train_main


def main(argv: list[str] | None = None) -> int:
    where = os.environ.get("RAY_ADDRESS")
    print(f"launcher: {'attaching to the Ray cluster at ' + where if where else 'starting an embedded local Ray'}",
          flush=True)
    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
