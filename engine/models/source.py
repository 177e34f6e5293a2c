"""What a model argument names: a checkpoint folder on this machine or a Hugging Face repo id.

Pure and light (no torch): the CLI checks a model argument with it before anything starts.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from corolla.engine.errors import CorollaError

CONFIG_FILE = "config.json"
_EXAMPLE = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The Hub's rule for a repo id: [owner/]name, letters, digits, '-', '_', '.', 96 characters each at most,
# neither starting nor ending with '-' or '.', and no '--' or '..'.
_PART = r"(?![-.])[\w.-]{1,96}(?<![-.])"
_REPO_ID = re.compile(rf"{_PART}(/{_PART})?", re.ASCII)


def looks_local(name_or_path: str) -> bool:
    """Whether a model argument is meant as a folder on this machine rather than a Hub repo id.

    Absolute paths and ones starting with ``.``, ``~`` or a drive are folders; so is ``a/b`` when ``a``
    is a folder here. A Hub repo id (``owner/name``) never starts with those.
    """
    if name_or_path.startswith((".", "~")) or os.path.isabs(name_or_path) or "\\" in name_or_path:
        return True
    first = Path(name_or_path).parts[0] if Path(name_or_path).parts else ""
    return "/" in name_or_path and Path(first).is_dir()


def is_repo_id(name: str) -> bool:
    """Whether ``name`` is spelled like a Hugging Face repo id (``owner/name`` or ``name``)."""
    return bool(_REPO_ID.fullmatch(name)) and "--" not in name and ".." not in name


def check_model_source(name_or_path: str) -> Path | None:
    """The checkpoint folder ``name_or_path`` names, or None for a Hub repo id; checked without loading.

    Raises:
        CorollaError: a file, a missing folder, a folder without ``config.json``, or a name that is
            neither a folder here nor a repo id; the message says what to give instead.
    """
    give = f"Give a folder holding {CONFIG_FILE} and *.safetensors, or a Hugging Face repo id such as {_EXAMPLE}."
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise CorollaError(f"{name_or_path}: the folder has no {CONFIG_FILE}, so it is not a checkpoint. {give}")
        return path
    if path.exists():
        raise CorollaError(f"{name_or_path}: is a file, not a checkpoint folder. {give}")
    if looks_local(name_or_path):
        raise CorollaError(f"{name_or_path}: no such folder. {give}")
    if not is_repo_id(name_or_path):
        raise CorollaError(f"{name_or_path!r} is neither a folder here nor a Hugging Face repo id. {give}")
    return None


def model_id(name_or_path: str) -> str:
    """The name a person would type for a model: a repo id as is, a local folder by its own name."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() or looks_local(name_or_path):
        return path.resolve().name or name_or_path
    return name_or_path
