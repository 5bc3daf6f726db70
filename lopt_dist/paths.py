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
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

_HUB_PART = r"(?![-.])[A-Za-z0-9_.-]{1,96}(?<![-.])"
_HUB_ID = re.compile(rf"{_HUB_PART}(/{_HUB_PART})?")


def local_path_reason(name: str) -> str | None:
    """Why `name` reads as a local path (one of the rules above), or None when it reads as a hub id."""
    if name in (".", "..") or name.startswith(("/", "./", "../", "~")):
        return "it starts like a path"
    if name.endswith(("/", os.sep)) or "\\" in name:
        return "it has a path separator at the end or a backslash"
    if not _HUB_ID.fullmatch(name) or "--" in name or ".." in name:
        return "it cannot be a hub id (owner/name)"
    parent = Path(name).parent
    if parent != Path(".") and parent.is_dir():
        return f"its directory {parent}/ exists here"
    return None


def missing_path_message(name: str, reason: str, what: str) -> str:
    """One line: `name` looks local (`reason`) but nothing is there; the closest existing names, if any."""
    path = Path(name).expanduser()
    text = f"{name} looks like a local path ({reason}) but there is no {what} at {path.absolute()}"
    if path.parent.is_dir():
        near = difflib.get_close_matches(path.name, [p.name for p in path.parent.iterdir()], n=1, cutoff=0.6)
        if near:
            text += f"; did you mean {path.parent / near[0]}?"
    return text + ". Fix the path (hub ids are written owner/name, without a leading ./ or /)"
