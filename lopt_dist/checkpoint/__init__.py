"""Checkpoints, resume and export of a run, in one component.

    manager.py            RunCheckpoints: the one object the run loop calls (open, staging, commit, abort, export)
    store.py              committed checkpoints of an output_dir: staging, one-rename commit, `latest`, pruning
    resume.py             what state.json records, and the checks before a run resumes
    files.py              durable writes, OS errors named, deletion through a trash name
    safe_load.py          loading .pt files without unpickling code (DeepSpeed's loader included)
    rng.py                RNG states (Python, torch, CUDA) as safetensors
    deepspeed_state.py    a stage worker's save / load / export (collective over its group)
    local_state.py        the single-process trainer's save / load
    tensor_manifest.py    tensors.json: what each stage exports
    safetensors_io.py     safetensors written tensor by tensor, in bounded shards
    export.py             shards from the stages joined into a Hugging Face model directory
    stage_reader.py       fp32 masters read from checkpoint files one tensor at a time
    export_checkpoint.py  lopt-export
"""

from lopt_dist.checkpoint.files import CheckpointError, CheckpointWriteError
from lopt_dist.checkpoint.manager import RunCheckpoints
from lopt_dist.checkpoint.resume import ResumePoint, RunLayout

__all__ = ["CheckpointError", "CheckpointWriteError", "ResumePoint", "RunCheckpoints", "RunLayout"]
