"""Where loopus reads data from: a setting, never a hard-coded path."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "LOOPUS_DATA"
DATA_FILE_SUFFIXES = (".jsonl", ".txt")


def _setting(override: str | os.PathLike | None) -> Path:
    """`override` if given, else `$LOOPUS_DATA`, as a path (not yet checked)."""
    chosen = override if override is not None else os.environ.get(DATA_ENV)
    if chosen is None:
        raise FileNotFoundError(f"no data directory given: pass --data DIR or set {DATA_ENV}=DIR")
    return Path(chosen).expanduser()


def data_path(override: str | os.PathLike | None = None) -> Path:
    """The data setting as given: a data directory or a single `.txt`/`.jsonl` corpus file.

    `override` if given, else `$LOOPUS_DATA`; raises FileNotFoundError when it names nothing usable.
    """
    path = _setting(override)
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix not in DATA_FILE_SUFFIXES:
            raise ValueError(f"unsupported data file {path}: use a .jsonl file (with a text field), a .txt file "
                             "or a data directory")
        return path
    raise FileNotFoundError(f"data path {path} does not exist: pass --data DIR (or a .txt/.jsonl file) or set "
                            f"{DATA_ENV}=DIR")


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """The data directory: `override` if given, else `$LOOPUS_DATA`."""
    root = _setting(override)
    if root.is_file():
        raise FileNotFoundError(f"data directory {root} is a file, not a directory: pass --data DIR or set "
                                f"{DATA_ENV}=DIR")
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} does not exist: pass --data DIR or set {DATA_ENV}=DIR")
    return root


def data_file(relative: str, override: str | os.PathLike | None = None) -> Path:
    """A file inside the data directory, with an error that says which file and where it was looked for."""
    root = data_dir(override)
    if not (root / relative).exists():
        raise FileNotFoundError(f"{relative} not found in the data directory {root}")
    return root / relative
