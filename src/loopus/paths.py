"""Where loopus reads data from: a setting, never a hard-coded path."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "LOOPUS_DATA"


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """The data directory: `override` if given, else `$LOOPUS_DATA`."""
    chosen = override if override is not None else os.environ.get(DATA_ENV)
    if chosen is None:
        raise FileNotFoundError(f"no data directory given: pass --data DIR or set {DATA_ENV}=DIR")
    root = Path(chosen).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} does not exist: pass --data DIR or set {DATA_ENV}=DIR")
    return root


def data_file(relative: str, override: str | os.PathLike | None = None) -> Path:
    """A file inside the data directory, with an error that says which file and where it was looked for."""
    path = data_dir(override) / relative
    if not path.exists():
        raise FileNotFoundError(f"{relative} not found in the data directory {path.parent}")
    return path
