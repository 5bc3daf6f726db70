"""`lopt-export CHECKPOINT DIR`: a lopt-dist checkpoint -> an ordinary Hugging Face model directory.

Works on the checkpoint's files alone, tensor by tensor: each stage's `tensors.json` names what it exports and
`stage_reader` reads each tensor's fp32 master from the single-process state or the DeepSpeed ZeRO 0-3 files
(memory-mapped, never unpickled). No model is built and no stage is held whole; the base model provides only
its config, generation config and tokenizer. DIR must be new or empty unless --overwrite is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lopt_dist.checkpoint.export import ModelFiles, export_dtype, export_to, write_stage
from lopt_dist.checkpoint.files import CheckpointError
from lopt_dist.checkpoint.resume import read_state, verify_files
from lopt_dist.checkpoint.safetensors_io import Shard
from lopt_dist.checkpoint.stage_reader import open_stage
from lopt_dist.checkpoint.tensor_manifest import merged_reader, read_manifest
from lopt_dist.config import ConfigError, config_from_dict, parse_size


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, overwrite: bool = False,
                      dtype: str | None = None, shard_size: str | int | None = None) -> Path:
    """Write the model of `checkpoint` to `out_dir`; `dtype` / `shard_size` default to the run's export settings."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    _check_target(checkpoint, out_dir, overwrite)
    state = read_state(checkpoint)
    verify_files(checkpoint, state)
    cfg = config_from_dict(state["config"])
    torch_dtype = export_dtype(cfg) if dtype in (None, "auto") else getattr(torch, dtype)
    max_bytes = cfg.checkpoint.export_shard_bytes if shard_size is None else parse_size(shard_size)
    if not max_bytes or max_bytes < 1:
        raise ConfigError(f"--shard-size: expected bytes or a size such as '5GB', got {shard_size!r}")
    num_stages = len(state["layout"]["boundaries"]) + 1 if cfg.train.method == "lopt" else 1

    def write_shards(directory: Path) -> list[Shard]:
        shards: list[Shard] = []
        for i in range(num_stages):
            stage_dir = checkpoint / f"stage_{i}"
            entries, extra = read_manifest(stage_dir)
            read = merged_reader(open_stage(stage_dir, extra))  # LoRA adapters merged into their base weights
            shards += write_stage(directory, i, entries, read, max_bytes, torch_dtype)
        return shards

    try:
        files = ModelFiles.of(cfg.model.name)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.name: the checkpoint's base model {cfg.model.name!r} cannot be loaded ({err}); "
                          "lopt-export needs its config and tokenizer") from None
    return export_to(out_dir, write_shards, files, torch_dtype)


def _check_target(checkpoint: Path, out_dir: Path, overwrite: bool) -> None:
    ckpt, out = checkpoint.resolve(), out_dir.resolve()
    if out == ckpt or out in ckpt.parents or ckpt in out.parents:
        raise ConfigError(f"{out_dir}: is the checkpoint, inside it or around it; choose a directory elsewhere")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} is a file; give a new or empty directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(f"{out_dir} is not empty and lopt-export replaces the whole directory; give a new or "
                          "empty directory, or pass --overwrite to replace it")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lopt-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint directory, e.g. runs/lopt/checkpoints/step_000010")
    parser.add_argument("out_dir", help="where to write the Hugging Face model (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace out_dir even if it holds files")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="dtype of the written weights (auto: the run's checkpoint.export_dtype)")
    parser.add_argument("--shard-size",
                        help="largest shard, e.g. 5GB (default: the run's checkpoint.export_shard_size)")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, args.overwrite, args.dtype, args.shard_size)
    except (ConfigError, CheckpointError) as err:
        print(f"lopt-export: error: {err}", file=sys.stderr)
        return 2
    print(f"lopt-export: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
