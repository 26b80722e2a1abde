"""Helpers for a command that another package adds to ``wordystore`` (an entry point in the group
``wordystore.commands`` whose target is ``register(subparsers)``, as the trainer adds ``train``), so
that it reads and fails as the built-in commands do. Standard library only at import time: a
command registers without slowing ``wordystore --help``.

>>> from wordystore.commands import examples
>>> print(examples("wordystore train runs/wb1b.zarr"))
examples:
  wordystore train runs/wb1b.zarr
"""

from __future__ import annotations

import sys
from pathlib import Path


def examples(*lines: str) -> str:
    """A command's epilog: its examples, one per line.

    Parameters
    ----------
    *lines
        The example command lines, each with a comment if it needs one.

    Returns
    -------
    str
        ``examples:`` and the lines indented under it, for argparse's ``epilog``.
    """
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def progress(ns) -> bool:
    """Whether a command draws progress bars: on a terminal (stderr), unless ``--quiet``.

    Parameters
    ----------
    ns : argparse.Namespace
        The parsed command line; its ``quiet`` attribute, if any, turns the bars off.

    Returns
    -------
    bool
    """
    return not getattr(ns, "quiet", False) and sys.stderr.isatty()


def input_file(what: str, path: str, expected: str) -> Path:
    """``path`` as a Path if it is a file; else the one-line error a command reports.

    Parameters
    ----------
    what : str
        The flag or argument that named it (``--corpus``).
    path : str
        The path given.
    expected : str
        What the flag expects, for the error (``a UTF-8 text file``).

    Returns
    -------
    pathlib.Path

    Raises
    ------
    ValueError
        ``--corpus PATH does not exist; expected a UTF-8 text file`` (or ``is a directory``).
    """
    file = Path(path)
    problem = "does not exist" if not file.exists() else "is a directory" if file.is_dir() else None
    if problem:
        raise ValueError(f"{what} {path} {problem}; expected {expected}")
    return file


def check_mask_file(what: str, path: str) -> None:
    """Check that the notebook's token-mask file is at least a readable safetensors file.

    Parameters
    ----------
    what : str
        The flag that named it (``--token-masks``).
    path : str
        The path given.

    Raises
    ------
    ValueError
        One line saying what was wrong: missing, a directory, or not a safetensors file.
    """
    from safetensors import safe_open

    file = input_file(what, path, "the notebook's token-mask .safetensors file")
    try:
        with safe_open(str(file), framework="np"):
            pass
    except Exception as exc:  # safetensors raises its own SafetensorError (not an OSError)
        raise ValueError(
            f"{what} {path} is not a readable safetensors file ({exc}); expected the notebook's token-mask file"
        ) from None
