"""Reading checkpoint files without unpickling arbitrary objects.

Every `.pt` file a checkpoint holds is read with `torch.load(weights_only=True)`: tensors, plain containers
and numbers only, so a file planted in a checkpoint cannot run code. DeepSpeed's own files additionally hold
three small DeepSpeed types (a loss-scaler record, the ZeRO stage enum, a fragment address), which are allowed
by name and nothing else. DeepSpeed reads its files through its engine's `checkpoint_engine`; workers replace
the default one with `SafeTorchCheckpointEngine`, which loads that way and names the file on OS errors.
"""

from __future__ import annotations

import functools
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from lopt_dist.checkpoint.files import CheckpointError, open_for_write


def deepspeed_safe_globals() -> list[type]:
    """The non-torch types DeepSpeed pickles into its checkpoint files (listed with torch.serialization.
    get_unsafe_globals_in_checkpoint on ZeRO 0-3 checkpoints, fp32 and bf16, of DeepSpeed 0.19.8)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_tensors_file(path: str | Path, *, deepspeed: bool = False, mmap: bool = False,
                      map_location: Any = "cpu") -> Any:
    """`torch.load` that refuses pickled code, naming the file when it is unreadable."""
    path = Path(path)
    allowed = deepspeed_safe_globals() if deepspeed else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; resume from (or export) another checkpoint") from None
    except Exception as err:  # torch raises UnpicklingError or RuntimeError for bad files
        raise CheckpointError(f"{path} cannot be read: {_reason(path, err)}; resume from (or export) "
                              "another checkpoint") from None


def _reason(path: Path, err: Exception) -> str:
    if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err):
        # Name what was refused, not torch's advice on how to allow it.
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        return "it holds Python objects other than tensors, which lopt-dist never unpickles" + (
            f" (refused: {refused.group(1)})" if refused else "")
    if not zipfile.is_zipfile(path):
        return "it is truncated or not a torch file"
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


@functools.cache
def _engine_class():
    # Built on first use (DeepSpeed is imported only in processes that train with it), then reused.
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's default engine, but loading with weights_only=True and saving through a file object."""

        def save(self, state_dict, path: str):
            with open_for_write(path) as fh:
                torch.save(state_dict, fh, _use_new_zipfile_serialization=self.zipfile_serialization)

        def load(self, path: str, map_location=None):
            return load_tensors_file(path, deepspeed=True, map_location=map_location)

    return TorchCheckpointEngine, SafeTorchCheckpointEngine


def install_safe_checkpoint_engine(engine) -> None:
    """Make a DeepSpeed engine save and load through `SafeTorchCheckpointEngine`.

    Only DeepSpeed's default engine is replaced; a DeepSpeed JSON that asks for another writer (`checkpoint.writer`,
    datastates) is refused, since those load with pickle.
    """
    default, safe = _engine_class()
    current = engine.checkpoint_engine
    if isinstance(current, safe):
        return
    if type(current) is not default:
        raise CheckpointError(
            f"the DeepSpeed JSON selects the checkpoint engine {type(current).__name__}, which unpickles its files; "
            "remove 'checkpoint.writer' / 'datastates' from the JSON so lopt-dist can load checkpoints safely")
    engine.checkpoint_engine = safe(engine._config)
