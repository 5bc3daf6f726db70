"""`lopt-train`: parse -> build -> train -> close, with user errors reported once, without a traceback."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from lopt_dist.config import ConfigError, load_config

EXIT_USER_ERROR = 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message names the cause and the fix: the user needs the message, not a traceback."""
    from lopt_dist.data.formats import DataError
    from lopt_dist.model.parts import ModelStructureError

    return ConfigError, DataError, ModelStructureError


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lopt-train", description="Post-train a causal LM with LoPT.")
    parser.add_argument("config", nargs="?", help="experiment YAML (default: the built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.steps=20 (repeatable)")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                        help="continue from the latest checkpoint of output_dir, or from a checkpoint directory")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an error too, not only its one-line message")
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
    from lopt_dist.pipeline.errors import WorkerGroupError

    if args.overwrite:
        overrides.append("checkpoint.overwrite=true")
    try:
        cfg = load_config(args.config, overrides)
        from lopt_dist.run import train

        result = train(cfg)
    except (*_user_errors(), WorkerGroupError) as err:
        if args.debug:
            traceback.print_exc()
        print(f"lopt-train: error: {error_message(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    last = result.records[-1] if result.records else {}
    print(f"lopt-train: done. output: {result.output_dir}"
          + (f", final task loss {last['task_loss']:.4f}" if last else "")
          + (f", model: {result.model_dir}" if result.model_dir else ""))
    return 0


def error_message(err: BaseException) -> str:
    """What to print for an error: its first line when a user error caused it (raised here or inside a worker,
    whose traceback only `--debug` shows), else the whole text, which carries the worker's traceback."""
    text = str(err)
    if _caused_by_user(err):
        return text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return text


def _caused_by_user(err: BaseException | None) -> bool:
    # A worker's error arrives as Ray's RayTaskError, which is also an instance of the original error's class,
    # chained (`raise ... from`) under the group's WorkerFailedError.
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, _user_errors()):
            return True
        seen.add(id(err))
        err = err.__cause__
    return False


if __name__ == "__main__":
    sys.exit(train_main())
