"""wordystore: per-step training trajectories in a sharded, compressed zarr v3 store.

Write::

    with wordystore.create("run.zarr", wordystore.seed_kinds(50257, 64), token_sets=sets, config=cfg) as w:
        w.append(step, embeddings=..., grads=..., ...)

Read::

    from wordystore import trajectory
    t = trajectory.open("run.zarr")
    t.embeddings[0:200, "untrained"]

The package is a few folders, each a layer that imports only the ones below it (docs/architecture.md):
``tools``, ``analysis`` and ``recording`` over ``check`` and ``write``, over ``read``, over ``store``, over
``format``.
Importing the package registers zarr's ``"bfloat16"`` data type (zarr and numpy, no torch) and
nothing else: the names below are imported on first use (PEP 562), so ``wordystore --help`` and a
process that only unpickles a view do not pay for torch until they need it.
"""

import importlib
import importlib.util

from wordystore.format import bfloat16 as _bfloat16  # noqa: F401 - registers zarr's "bfloat16" data type
from wordystore.version import __version__ as __version__

# The public API: name -> the module that defines it, imported the first time the name is used.
_API = {
    **dict.fromkeys(
        [
            "AppendError",
            "CorruptChunkError",
            "FormatError",
            "ReadOnlyError",
            "StoreLockedError",
            "WordystoreError",
            "WriterFailedError",
            "StaleWriterError",
            "StorageError",
            "LeaseWaitWarning",
            "BackpressureWarning",
        ],
        "errors",
    ),
    "Kind": "format.kinds",
    "seed_kinds": "format.kinds",
    "AdamPrediction": "format.prediction",
    "AdamStepPrediction": "format.prediction",
    "adam_predictions": "format.prediction",
    "archive_predictions": "format.prediction",
    "load_state": "store.resume_state",
    "stored_bytes": "store.storage",
    "holds_trajectory": "store.storage",
    "Trajectory": "read.trajectory",
    "open": "read.trajectory",
    "WriterPools": "pools",
    "TrajectoryWriter": "write.writer",
    "create": "write.start",
    "resume": "write.start",
    "VerifyReport": "check.verification",
    "verify": "check.verification",
    "token_sets_from_ids": "tools.token_sets",
    "token_sets_from_mask_file": "tools.token_sets",
}
# Modules named at the top for short imports: ``from wordystore import trajectory``.
_MODULES = {"trajectory": "read.trajectory"}
__all__ = sorted([*_API, *_MODULES, "__version__"])


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
    elif name in _MODULES:
        value = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    elif (
        name.isidentifier() and not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None
    ):
        value = importlib.import_module(f"{__name__}.{name}")  # a folder or module: wordystore.analysis, wordystore.cli
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
