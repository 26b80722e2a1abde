"""wordystore: per-step training trajectories in a sharded, compressed zarr v3 store.

Write::

    with wordystore.create("run.zarr", wordystore.seed_kinds(50257, 64), token_sets=sets, config=cfg) as w:
        w.append(step, embeddings=..., grads=..., ...)

Read::

    from wordystore import trajectory
    t = trajectory.open("run.zarr")
    t.embeddings[0:200, "untrained"]
"""

from wordystore import bfloat16 as _bfloat16  # registers zarr's "bfloat16" data type
from wordystore import trajectory
from wordystore.errors import (
    AppendError,
    BackpressureWarning,
    CorruptChunkError,
    FormatError,
    ReadOnlyError,
    StoreLockedError,
    WordystoreError,
    WriterFailedError,
)
from wordystore.kinds import Kind, seed_kinds
from wordystore.lifecycle import create, resume
from wordystore.pools import WriterPools
from wordystore.prediction import AdamPrediction, adam_predictions
from wordystore.resume_state import load_state
from wordystore.trajectory import Trajectory
from wordystore.verify import VerifyReport, verify
from wordystore.version import __version__
from wordystore.writer import TrajectoryWriter

open = trajectory.open  # noqa: A001
__all__ = [
    "AdamPrediction", "AppendError", "BackpressureWarning", "CorruptChunkError", "FormatError", "Kind", "ReadOnlyError", "StoreLockedError",
    "Trajectory", "TrajectoryWriter", "VerifyReport", "WriterPools", "WordystoreError", "WriterFailedError",
    "adam_predictions", "create", "load_state", "open", "resume", "seed_kinds", "trajectory", "verify",
]
