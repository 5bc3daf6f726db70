"""`lopt-train`: parse -> build -> train -> close, with user errors reported once, without a traceback."""

from __future__ import annotations

import argparse
import logging
import sys

from lopt_dist.config import ConfigError, load_config


def _user_errors() -> tuple[type[BaseException], ...]:
    from lopt_dist.data.formats import DataError
    from lopt_dist.model.parts import ModelStructureError
    from lopt_dist.pipeline.errors import WorkerGroupError

    return ConfigError, DataError, ModelStructureError, WorkerGroupError


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lopt-train", description="Post-train a causal LM with LoPT.")
    parser.add_argument("config", nargs="?", help="experiment YAML (default: the built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.steps=20 (repeatable)")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                        help="continue from the latest checkpoint of output_dir, or from a checkpoint directory")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an output_dir that holds checkpoints, deleting its checkpoints, metrics "
                             "and model (without it such a run is refused)")
    return parser


def train_main(argv: list[str] | None = None) -> int:
    args = train_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    if args.overwrite:
        overrides.append("checkpoint.overwrite=true")
    try:
        cfg = load_config(args.config, overrides)
        from lopt_dist.run import train

        result = train(cfg)
    except _user_errors() as err:
        print(f"lopt-train: error: {err}", file=sys.stderr)
        return 2
    last = result.records[-1] if result.records else {}
    print(f"lopt-train: done. output: {result.output_dir}"
          + (f", final task loss {last['task_loss']:.4f}" if last else "")
          + (f", model: {result.model_dir}" if result.model_dir else ""))
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
