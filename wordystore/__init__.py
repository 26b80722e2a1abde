"""wordystore: per-step training trajectories in a sharded, compressed zarr v3 store.

Write::

    with wordystore.create("run.zarr", wordystore.seed_kinds(50257, 64), token_sets=sets, config=cfg) as w:
        w.append(step, embeddings=..., grads=..., ...)

Read::

    from wordystore import trajectory
    t = trajectory.open("run.zarr")
    t.embeddings[0:200, "untrained"]

Importing the package registers zarr's ``"bfloat16"`` data type (zarr and numpy, no torch) and
nothing else: the names below are imported on first use (PEP 562), so ``wordystore --help`` and a
process that only unpickles a view do not pay for torch until they need it.
"""

import importlib
import importlib.util
import sys
import types

from wordystore import bfloat16 as _bfloat16  # noqa: F401 - registers zarr's "bfloat16" data type
from wordystore.version import __version__

# The public API: name -> the module that defines it, imported the first time the name is used.
_API = {
    "AppendError": "errors", "CorruptChunkError": "errors", "FormatError": "errors", "ReadOnlyError": "errors",
    "StoreLockedError": "errors", "WordystoreError": "errors", "WriterFailedError": "errors",
    "StaleWriterError": "errors", "StorageError": "errors", "LeaseWaitWarning": "errors",
    "BackpressureWarning": "errors",
    "Kind": "kinds", "seed_kinds": "kinds",
    "create": "lifecycle", "resume": "lifecycle",
    "AdamPrediction": "prediction", "AdamStepPrediction": "prediction", "adam_predictions": "prediction",
    "archive_predictions": "prediction",
    "WriterPools": "pools",
    "load_state": "resume_state",
    "Trajectory": "trajectory", "open": "trajectory",
    "VerifyReport": "verify", "verify": "verify",
    "TrajectoryWriter": "writer",
}
__all__ = sorted([*_API, "trajectory"])


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
    elif name.isidentifier() and not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")  # a module: wordystore.analysis, wordystore.stitch...
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """The package, whose API's ``verify`` (a function) shares its name with the module ``wordystore.verify``:
    importing that module must not rebind ``wordystore.verify`` to it, as importing a submodule does."""

    def __setattr__(self, name: str, value) -> None:
        if not (isinstance(value, types.ModuleType) and _API.get(name) == name):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
