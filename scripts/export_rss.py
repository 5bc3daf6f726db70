"""Peak host memory of the two exports: the driver's during a Ray run's export, and `lopt-export`'s.

A random Llama of about 0.1B parameters is saved in bf16, trained one step by 1+1 Ray workers (ZeRO-0), and
exported; then its checkpoint is exported again with `lopt-export` in a child process. Linux only (reads
/proc/self/status; the peak is reset through /proc/self/clear_refs just before the export).

    PYTHONPATH=$PWD python scripts/export_rss.py --out /tmp/export-rss
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def make_model(out: Path, layers: int, hidden: int, intermediate: int) -> tuple[Path, int]:
    from lopt_dist.model.loading import load_tokenizer
    from lopt_dist.model.tiny import tiny_config

    tokenizer = load_tokenizer("smollm2-135m")
    config = tiny_config("llama", len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, params


_CHILD = """
import resource, sys, time
from pathlib import Path
from lopt_dist.checkpoint.export_checkpoint import main
lines = lambda: Path('/proc/self/status').read_text().splitlines()
status = lambda f: next(int(l.split()[1]) for l in lines() if l.startswith(f))
before, start = status('VmRSS:'), time.perf_counter()
assert main(sys.argv[1:]) == 0
print('FIGURES', before / 1024, status('VmHWM:') / 1024, time.perf_counter() - start)
"""


def lopt_export_peak(checkpoint: Path, target: Path) -> dict:
    """lopt-export in a fresh process: its RSS once imports are done, and its peak (MiB)."""
    done = subprocess.run([sys.executable, "-c", _CHILD, str(checkpoint), str(target), "--overwrite"], check=True,
                          capture_output=True, text=True)
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("FIGURES"))
    before, peak, seconds = (float(x) for x in line.split()[1:])
    return {"lopt_export_rss_after_imports_mib": before, "lopt_export_peak_rss_mib": peak,
            "lopt_export_seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=2048)
    args = parser.parse_args()
    import ray

    from lopt_dist.checkpoint import RunCheckpoints
    from lopt_dist.config import load_config
    from lopt_dist.run import train

    out = Path(args.out)
    model_dir, params = make_model(out / "model-bf16", args.layers, args.hidden, args.intermediate)
    figures: dict = {"params": params}
    export = RunCheckpoints.export

    def measured_export(self, write_shards):
        figures["driver_rss_before_export_mib"] = _status_kib("VmRSS") / 1024
        _reset_peak()
        start = time.perf_counter()
        result = export(self, write_shards)
        figures["driver_peak_during_export_mib"] = _status_kib("VmHWM") / 1024
        figures["export_seconds"] = time.perf_counter() - start
        return result

    RunCheckpoints.export = measured_export
    zero0 = str(REPO / "configs/deepspeed/zero0.json")
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    result = train(load_config(None, [
        f"model.name={model_dir}", f"output_dir={out / 'run'}", "checkpoint.overwrite=true", "runtime.mode=ray",
        "train.steps=1", "train.micro_batch_size=1", "data.builtin_samples=4", "data.max_seq_length=160",
        "train.dtype=bfloat16", "logging.progress=false",
        f"runtime.groups=[{{deepspeed_config: {zero0}}}, {{deepspeed_config: {zero0}}}]",
    ]))
    ray.shutdown()
    figures.update(lopt_export_peak(result.checkpoint, out / "lopt-export"))
    figures["model_bytes_bf16_mib"] = params * 2 / 2**20
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
