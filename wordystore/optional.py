"""The optional parts of wordystore (pyproject.toml's extras: train, analysis, tensorboard, s3,
completion) and how to install one.

wordystore is not published on a package index, so ``pip install 'wordystore[train]'`` finds
nothing: every hint says what works instead, a path, a git URL or a built wheel.

>>> from wordystore.optional import require
>>> require("matplotlib", "analysis", "plots")   # raises MissingExtraError if matplotlib is missing
"""

from __future__ import annotations

import importlib.util

from wordystore.errors import MissingExtraError


def install_hint(extra: str) -> str:
    """How to install wordystore with ``extra``, without a package index."""
    return (
        f"install wordystore with its '{extra}' extra from its source: pip install -e '.[{extra}]' in a clone, "
        f"pip install '/path/to/wordystore[{extra}]', 'wordystore[{extra}] @ git+URL', "
        f"or a wheel built with pip wheel . (pip install './wordystore-*.whl[{extra}]')"
    )


def missing(*modules: str) -> list[str]:
    """The ``modules`` that cannot be imported, found without importing them."""
    absent = []
    for name in modules:
        try:
            if importlib.util.find_spec(name) is None:
                absent.append(name)
        except (ImportError, ValueError):  # ValueError: sys.modules[name] is None (blocked, as in the tests)
            absent.append(name)
    return absent


def require(module: str, extra: str, needed_for: str) -> None:
    """Raise :class:`MissingExtraError` if ``module`` (of ``extra``) cannot be imported."""
    if missing(module):
        raise MissingExtraError(f"{needed_for}: {module} is not installed; {install_hint(extra)}")
