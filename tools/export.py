"""`lopt-export CHECKPOINT OUT_DIR`: a lopt-dist checkpoint -> an ordinary Hugging Face model directory.

Reads the run's config from the checkpoint, rebuilds the stages from the base model, loads each stage's
trained weights (single-process state, or a DeepSpeed ZeRO 0-3 checkpoint gathered to fp32), drops the
reconstruction decoders and writes the rejoined model with the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lopt_dist.config import ConfigError, config_from_dict
from lopt_dist.model import split_model
from lopt_dist.model.export import export_model
from lopt_dist.model.loading import load_causal_lm, load_model_config, load_tokenizer


def stage_state(stage_dir: Path) -> dict[str, torch.Tensor]:
    """The module state of one stage, whatever wrote it."""
    if (stage_dir / "state.pt").is_file():  # single-process trainer
        return torch.load(stage_dir / "state.pt", map_location="cpu", weights_only=False)["module"]
    ds_dir = stage_dir / "state"
    if any(ds_dir.glob("*optim_states.pt")) and any(ds_dir.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(stage_dir), tag="state")
    model_file = ds_dir / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise ConfigError(f"{stage_dir} holds no stage weights (no state.pt, no DeepSpeed checkpoint)")
    return torch.load(model_file, map_location="cpu", weights_only=False)["module"]


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    checkpoint = Path(checkpoint)
    state_file = checkpoint / "state.json"
    if not state_file.is_file():
        raise ConfigError(f"{checkpoint} is not a lopt-dist checkpoint (no state.json)")
    cfg = config_from_dict(json.loads(state_file.read_text())["config"])
    model = load_causal_lm(cfg.model.name)
    if cfg.train.method == "e2e":
        model.load_state_dict(stage_state(checkpoint / "stage_0"))
        weights = [model.state_dict()]
    else:
        stages = split_model(model, cfg.model.boundaries, cfg.train.lambda_aux, cfg.train.seed)
        for i, stage in enumerate(stages):
            stage.load_state_dict(stage_state(checkpoint / f"stage_{i}"))
        weights = [s.hf_state_dict() for s in stages]
    return export_model(weights, load_model_config(cfg.model.name), load_tokenizer(cfg.model.name), out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lopt-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint directory, e.g. runs/lopt/checkpoints/step_000010")
    parser.add_argument("out_dir", help="where to write the Hugging Face model")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir)
    except ConfigError as err:
        print(f"lopt-export: error: {err}", file=sys.stderr)
        return 2
    print(f"lopt-export: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
