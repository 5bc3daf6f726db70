"""`lopt-train`: parse -> build -> train -> close, with user errors reported once, without a traceback."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import traceback

from lopt_dist.config import load_config
from lopt_dist.errors import caused_by_user, user_error_types

EXIT_USER_ERROR = 2  # a config, data, model or checkpoint problem: the message names the fix
EXIT_FAILED = 3  # workers failed beyond what the run recovers from: continue with --resume
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT, at a checkpoint if one fitted: continue with --resume
EXIT_ABORTED = 130  # a second signal: aborted at once


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
    from lopt_dist.recovery import RunFailedError, RunStopped

    if args.overwrite:
        overrides.append("checkpoint.overwrite=true")
    try:
        cfg = load_config(args.config, overrides)
        from lopt_dist.run import train

        result = train(cfg)
    except RunStopped as stopped:
        print(f"lopt-train: {stopped.one_line(resume_command(args))}", file=sys.stderr)
        return EXIT_STOPPED
    except RunFailedError as err:
        if args.debug:
            traceback.print_exc()
        print(f"lopt-train: error: {err.one_line(resume_command(args))}", file=sys.stderr)
        return EXIT_USER_ERROR if err.failure.user_error else EXIT_FAILED
    except (*user_error_types(), WorkerGroupError) as err:
        if args.debug:
            traceback.print_exc()
        print(f"lopt-train: error: {error_message(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("lopt-train: aborted by a second signal; the newest committed checkpoint is kept (--resume continues "
              "from it)", file=sys.stderr)
        return EXIT_ABORTED
    last = result.records[-1] if result.records else {}
    print(f"lopt-train: done. output: {result.output_dir}"
          + (f", final task loss {last['task_loss']:.4f}" if last else "")
          + (f", model: {result.model_dir}" if result.model_dir else ""))
    return 0


def resume_command(args: argparse.Namespace) -> str:
    """The command that continues this run from its newest checkpoint: the same config and overrides, --resume."""
    parts = ["lopt-train", *([args.config] if args.config else [])]
    for override in args.overrides:
        parts += ["--set", override]
    return shlex.join([*parts, "--resume"])


def error_message(err: BaseException) -> str:
    """What to print for an error: its first line when a user error caused it (raised here or inside a worker,
    whose traceback only `--debug` shows), else the whole text, which carries the worker's traceback."""
    text = str(err)
    if caused_by_user(err):
        return text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return text


if __name__ == "__main__":
    sys.exit(train_main())
