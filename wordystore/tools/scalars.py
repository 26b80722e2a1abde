"""``wordystore export-scalars``: a recorded run's scalar kinds where people look at curves, TensorBoard.

>>> from wordystore.tools.scalars import export_scalars
>>> export_scalars("runs/wb1b.zarr", "tb/wb1b")      # {"losses": 200, "learning_rate": 200, ...}

Every 0-d kind (``losses``, ``learning_rate``, ``grad_norm``, ``grad_norm_clipped``) becomes a
scalar series tagged with the kind's name, at the training step of each row; rows without a value
(row 0's NaN: the state before training) are left out. The run's config summary goes in as text.
Needs the ``tensorboard`` extra (PyTorch's ``SummaryWriter`` writes through it). A run being
recorded can report to TensorBoard itself: ``wordystore train ... --training-arg report_to=tensorboard``.
"""

from __future__ import annotations

import os

import numpy as np

from wordystore.analysis import measures
from wordystore.optional import require
from wordystore.read import display, trajectory
from wordystore.store.storage import describe


def export_scalars(store, log_dir, *, progress: bool = False) -> dict[str, int]:
    """Write the scalar kinds of the trajectory at ``store`` into an event file under ``log_dir``;
    returns how many values each tag got."""
    require("tensorboard", "tensorboard", "TensorBoard event files")
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    t = trajectory.open(store)
    curves = measures.curves(t)
    tags = [name for name in curves if name != "step"]
    if not tags:
        raise ValueError(f"{describe(t.store)} records no scalar (0-d) kind; its kinds are {list(t.kinds)}")
    written = {}
    with SummaryWriter(log_dir=os.fspath(log_dir)) as writer:
        writer.add_text("config", "\n".join(f"- {line}" for line in display.config_summary(t.config)) or "(none)")
        for tag in tqdm(tags, desc="export-scalars", unit="kind", disable=not progress):
            rows = np.flatnonzero(~np.isnan(curves[tag]))
            for row in rows:
                writer.add_scalar(tag, curves[tag][row], global_step=int(curves["step"][row]))
            written[tag] = int(rows.size)
    return written
