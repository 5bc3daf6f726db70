"""Training loops that run in one process, and the optimizer and schedule every path shares.

`lopt_dist.train` is also the Python API's entry point: `lopt_dist.train(cfg)` runs an experiment as `lopt-train`
does (lopt_dist/run.py) and returns its RunResult. The package stays a package (`lopt_dist.train.local`, ...); its
module object is made callable here, because a function named `train` in lopt_dist/__init__.py would be replaced
by this subpackage as soon as anything imports from it.
"""

from __future__ import annotations

import sys
import types


class _TrainPackage(types.ModuleType):
    def __call__(self, config):
        """Run the experiment `config` (an ExperimentConfig; or a YAML path) and return its RunResult."""
        from lopt_dist.config import ExperimentConfig, load_config
        from lopt_dist.run import train

        return train(config if isinstance(config, ExperimentConfig) else load_config(config))


sys.modules[__name__].__class__ = _TrainPackage
