"""Telling a local path from a Hugging Face hub id, for `model.name` and `data.source`.

A name that is not an existing directory or file is looked up on the hub, unless it *looks local*; then it is
an error naming the path, so that a typo such as `models/tiny-lama` never turns into a download of someone
else's repository. A name looks local when (first rule that applies):

1. it starts with `/`, `./`, `../` or `~`, or is `.` or `..`;
2. it ends with a path separator, or contains a backslash;
3. it cannot be a hub id: hub ids are `name` or `owner/name`, each part 1-96 of `A-Z a-z 0-9 _ . -`,
   without `--` or `..`, not starting or ending with `-` or `.`;
4. it is `owner/name` and `owner` is an existing local directory.

Anything else (`gpt2`, `HuggingFaceTB/SmolLM2-135M`) is a hub id. Write `./name` to force a local path.

Where a relative path points (README: "Paths"):
- what a run *reads* and a YAML file names (model.name when it is a local path, data.source, eval.source, each
  group's deepspeed_config) is relative to the YAML file's directory, so an experiment file works from any
  directory (`anchor_inputs`); `--set` values are relative to the current directory;
- what a run *writes* (output_dir, and checkpoint.resume, which points into it) is relative to the current
  directory, or to `storage_path` when given (`output_location`). Under `ray job submit` the current directory
  is Ray's temporary copy of the working directory, which other nodes do not see and Ray deletes: there a
  relative output_dir needs storage_path (or write an absolute output_dir).
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path
from typing import Any

BUILTIN_PREFIX = "builtin:"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
# Set by Ray for the entry point of a job submitted with `ray job submit` (ray._private.runtime_env.constants).
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"

_HUB_PART = r"(?![-.])[A-Za-z0-9_.-]{1,96}(?<![-.])"
_HUB_ID = re.compile(rf"{_HUB_PART}(/{_HUB_PART})?")


def local_path_reason(name: str, base: Path | None = None) -> str | None:
    """Why `name` reads as a local path (one of the rules above), or None when it reads as a hub id.
    `base`: the directory a relative name is relative to (default: the current directory)."""
    if name in (".", "..") or name.startswith(("/", "./", "../", "~")):
        return "it starts like a path"
    if name.endswith(("/", os.sep)) or "\\" in name:
        return "it has a path separator at the end or a backslash"
    if not _HUB_ID.fullmatch(name) or "--" in name or ".." in name:
        return "it cannot be a hub id (owner/name)"
    parent = Path(name).parent
    if parent != Path(".") and (base or Path(".")).joinpath(parent).is_dir():
        return f"its directory {parent}/ exists " + ("here" if base is None else f"in {base}")
    return None


def is_local_input(name: str, base: Path | None = None, *, data: bool = False) -> bool:
    """Whether `name` (model.name, or with `data` a data source) names a local path rather than an alias, a
    hub id or a built-in dataset; a relative one is looked up in `base` (default: the current directory)."""
    if data and name.startswith(BUILTIN_PREFIX):
        return False
    if data and Path(name).suffix.lower() in LOCAL_SUFFIXES:
        return True
    return local_path_reason(name, base) is not None or (base or Path(".")).joinpath(name).expanduser().exists()


def anchor_inputs(tree: dict[str, Any], base: Path) -> None:
    """Make the input paths of a YAML file's (unvalidated) tree relative to `base`, the file's directory.

    Only relative local paths change: aliases, hub ids, built-in datasets, absolute and `~` paths stay as
    written. Values of the wrong type are left for the config's validation to report.
    """
    def anchor(value: Any, *, data: bool = False, always: bool = False) -> Any:
        if not isinstance(value, str) or not value or value.startswith(("/", "~")):
            return value
        if always or is_local_input(value, base, data=data):
            return os.path.normpath(base / value)
        return value

    model, data, evaluation, runtime = (tree.get(k) for k in ("model", "data", "eval", "runtime"))
    if isinstance(model, dict) and "name" in model:
        model["name"] = anchor(model["name"])
    for section in (data, evaluation):
        if isinstance(section, dict) and "source" in section:
            section["source"] = anchor(section["source"], data=True)
    groups = runtime.get("groups") if isinstance(runtime, dict) else None
    for group in groups if isinstance(groups, list) else []:
        if isinstance(group, dict) and "deepspeed_config" in group:
            group["deepspeed_config"] = anchor(group["deepspeed_config"], always=True)


def submitted_job() -> bool:
    """Whether this process is the entry point of a `ray job submit` job."""
    return RAY_JOB_CONFIG_ENV in os.environ


def job_working_dir() -> str | None:
    """The working_dir a submitted job was given (`--working-dir`), as Ray recorded it, if any."""
    try:
        runtime_env = json.loads(os.environ.get(RAY_JOB_CONFIG_ENV, "{}")).get("runtime_env") or {}
    except ValueError:
        return None
    return runtime_env.get("working_dir")


def output_location(path: str, storage_path: str | None, key: str) -> Path:
    """Where a run writes `path` (output_dir, or a checkpoint.resume directory), as an absolute path.

    Raises ValueError (the caller words it as a ConfigError) for a relative path under `ray job submit`
    without storage_path: the job's current directory is Ray's temporary copy of its working directory.
    """
    target = Path(path).expanduser()
    if target.is_absolute():
        return target
    if storage_path is not None:
        return Path(storage_path).expanduser() / target
    if submitted_job():
        raise ValueError(
            f"{key}: {path} is relative, but under `ray job submit` the current directory ({Path.cwd()}) is Ray's "
            "temporary copy of the working directory, which other nodes do not see and Ray deletes; give an "
            f"absolute {key} on storage every node sees, or set storage_path=/shared/dir (relative output "
            "directories go under it)")
    return target.absolute()


def missing_path_message(name: str, reason: str, what: str) -> str:
    """One line: `name` looks local (`reason`) but nothing is there; the closest existing names, if any."""
    path = Path(name).expanduser()
    text = f"{name} looks like a local path ({reason}) but there is no {what} at {path.absolute()}"
    if path.parent.is_dir():
        near = difflib.get_close_matches(path.name, [p.name for p in path.parent.iterdir()], n=1, cutoff=0.6)
        if near:
            text += f"; did you mean {path.parent / near[0]}?"
    return text + ". Fix the path (hub ids are written owner/name, without a leading ./ or /)"
