"""`lopt-eval MODEL`: task fit, task accuracy and retention of a Hugging Face causal LM, as one JSON result.

Figures (same numbers for the same model and settings: greedy decoding, eval mode, the first rows of the file):
  answer_loss           mean cross-entropy per answer token on held-out problems (prompt masked, as in training)
  accuracy              greedy answers whose final number equals the reference's (GSM8K `#### N` style)
  retention_perplexity  perplexity of general text no task data comes from (default: Python's pydoc topics)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .evaluation import DEFAULT_DATA, EvalConfig, EvalError, evaluate

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EvalConfig)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lopt-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a Hugging Face model directory (e.g. from lopt-export) or an alias "
                                      "(smollm2-135m)")
    parser.add_argument("--data", help=f"held-out .jsonl/.json/.parquet in any lopt-dist row format "
                                       f"(default: {DEFAULT_DATA} when it exists)")
    parser.add_argument("--format", default=_DEFAULTS["format"], help="row format of --data (default: auto)")
    _int(parser, "--num-loss", "num_loss", "problems for the answer loss (0 skips it)")
    _int(parser, "--num-accuracy", "num_accuracy", "problems for the accuracy (0 skips it)")
    _int(parser, "--max-new-tokens", "max_new_tokens", "generation length for the accuracy")
    _int(parser, "--max-seq-length", "max_seq_length", "prompt + answer tokens kept for the answer loss")
    parser.add_argument("--retention-text", help="a UTF-8 text file for retention (default: pydoc_data.topics)")
    _int(parser, "--window", "window", "tokens per retention window")
    _int(parser, "--num-windows", "num_windows", "retention windows (0 skips retention)")
    _int(parser, "--batch-size", "batch_size", "sequences per forward pass or generate call")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=_DEFAULTS["device"])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=_DEFAULTS["dtype"])
    _int(parser, "--seed", "seed", "seed for torch, numpy and random")
    parser.add_argument("--out", help="write the full JSON result (figures, settings, per-problem records) here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    return parser


def _int(parser: argparse.ArgumentParser, flag: str, field: str, text: str) -> None:
    parser.add_argument(flag, type=int, default=_DEFAULTS[field], help=f"{text} (default: {_DEFAULTS[field]})")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    return EvalConfig(
        model=args.model, data=args.data, format=args.format, num_loss=args.num_loss,
        num_accuracy=args.num_accuracy, max_new_tokens=args.max_new_tokens, max_seq_length=args.max_seq_length,
        retention_text=args.retention_text, window=args.window, num_windows=args.num_windows,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype, seed=args.seed,
        progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = evaluate(config_from_args(args))
    except EvalError as err:
        print(f"lopt-eval: error: {err}", file=sys.stderr)
        return 2
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        # The file has the per-problem records; the terminal gets the summary they would bury.
        print(json.dumps({k: v for k, v in result.items() if k != "records"}, indent=2))
        print(f"lopt-eval: wrote {out}", file=sys.stderr)
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
