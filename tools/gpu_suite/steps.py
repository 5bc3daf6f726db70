"""The suite's steps, each one command in a fresh process, so that one step's failure or memory is its own.

GPU mode (the default) trains SmolLM2-135M and a random ~1B Llama in bf16 on CUDA; `smoke` runs the same
commands on the CPU with a tiny random model and a few steps, to check the suite's own plumbing anywhere.
Budget on one H100: about 8 minutes for everything (timeouts below are per step, generous).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

# A Llama of ~1.1B parameters (TinyLlama-like widths, 16 layers, 32k vocabulary), random weights, fp32 master.
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=32000)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512)


@dataclass(frozen=True)
class Step:
    name: str
    kind: str  # "tests", "train-local", "train-pipeline", "bench"
    argv: list[str] = field(default_factory=list)
    out: str = ""  # the step's own directory under the suite's output
    timeout_s: float = 600.0
    skip_reason: str | None = None
    describes: str = ""


def plan(out: Path, gpus: int, smoke: bool, steps: int, model: str = "smollm2-135m") -> list[Step]:
    """`model`: what lopt-train trains (smoke mode passes a tiny random checkpoint's directory)."""
    py = sys.executable
    device = "cpu" if smoke else "cuda"
    tiny_model = ["--model", "random:llama"] + [f"--model-set={k}={v}" for k, v in TINY.items()]
    train_common = [f"runtime.device={device}", "train.dtype=bfloat16", f"train.steps={steps}",
                    "train.micro_batch_size=8", "train.micro_batches_per_step=2", "train.lr=1e-4",
                    "data.max_seq_length=256", "logging.progress=false", "checkpoint.export=false",
                    "checkpoint.keep_last=1"]
    if smoke:
        train_common += ["data.builtin_samples=64", "train.micro_batch_size=2", "data.max_seq_length=64"]
    zero0 = "configs/deepspeed/zero0.json"
    pipeline = ["runtime.mode=ray", f"runtime.groups=[{{deepspeed_config: {zero0}}}, {{deepspeed_config: {zero0}}}]"]
    result = [Step("gpu-tests", "tests", [py, "-m", "pytest", "tests/gpu", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                                          "-rs", f"--junitxml={out / 'gpu-tests' / 'junit.xml'}"],
                   "gpu-tests", 420, "smoke mode runs no GPU test" if smoke else None,
                   "tests/gpu: bf16 trainer on CUDA, staging and NCCL transport, shared-GPU pipeline, telemetry")]
    for method in ("lopt", "e2e"):
        name = f"local-{method}-bf16"
        result.append(Step(name, "train-local", _train(py, out / name, model, [*train_common, "runtime.mode=local",
                                                                                 f"train.method={method}"], smoke),
                           name, 300, None, f"single process, {method}, bf16, on the arithmetic task"))
    name = "pipeline-shared-gpu"
    result.append(Step(name, "train-pipeline", _train(py, out / name, model, [*train_common, *pipeline,
                                                                              "runtime.gpus_per_worker=0.5"], smoke),
                       name, 420, None, "Ray pipeline, two stage workers sharing one GPU (gpus_per_worker 0.5)"))
    name = "pipeline-nccl"
    result.append(Step(name, "train-pipeline", _train(py, out / name, model, [*train_common, *pipeline,
                                                                              "runtime.transport=nccl"], smoke),
                       name, 420, "needs two GPUs" if gpus < 2 and not smoke else "smoke mode has no GPU" if smoke
                       else None,
                       "Ray pipeline, one GPU per stage worker, NCCL boundary"))
    bench = [py, "-m", "tools.bench", "--device", device, "--dtype", "bfloat16", "--rows", "e2e,lopt",
             "--warmup-steps", "2", "--steps", "5" if not smoke else "1"]
    sizes = ["--seq-len", "512", "--global-batch", "32", "--micro-batches", "4"]
    if smoke:
        sizes = ["--seq-len", "32", "--global-batch", "4", "--micro-batches", "2"]
    llama = ["--model", "random:llama"] + [f"--model-set={k}={v}" for k, v in LLAMA_1B.items()]
    for name, which, shape in (("bench-smollm2-135m", tiny_model if smoke else ["--model", model], sizes),
                               ("bench-llama-1b", tiny_model if smoke else llama,
                                sizes if smoke else ["--seq-len", "1024", "--global-batch", "16", "--micro-batches", "4"])):
        result.append(Step(name, "bench", [*bench, *which, *shape, "--out", str(out / name)], name, 420, None,
                           f"lopt-bench single-device rows e2e and lopt, bf16, {name.removeprefix('bench-')}"))
    return result


def _train(py: str, out: Path, model: str, overrides: list[str], smoke: bool) -> list[str]:
    argv = [py, "-m", "lopt_dist.cli", "--set", f"output_dir={out}", "--set", f"model.name={model}"]
    for item in overrides:
        argv += ["--set", item]
    return argv
