"""Recording a training run into a trajectory, each parameter in its own dtype (docs/recording.md).

- :func:`kinds_for`: the kinds a recorder writes, to create the store with, and
  :func:`predictions_for`: Adam's moments stored as residuals, for the dtypes the format predicts;
- :class:`ParameterRecorder`: any PyTorch loop, one or many ranks;
- :class:`TrajectoryCallback`: the same inside a Hugging Face ``Trainer`` (needs the ``train``
  extra: imported on first use, so that this folder works without transformers).

>>> from wordystore.recording import ParameterRecorder, kinds_for
"""

import importlib

from wordystore.optional import require
from wordystore.recording.recorder import ParameterRecorder, kinds_for, named_parameters, predictions_for

__all__ = ["ParameterRecorder", "TrajectoryCallback", "kinds_for", "named_parameters", "predictions_for"]


def __getattr__(name: str):
    if name != "TrajectoryCallback":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    require("transformers", "train", "TrajectoryCallback (a Hugging Face Trainer callback)")
    value = importlib.import_module(f"{__name__}.callback").TrajectoryCallback
    globals()[name] = value
    return value
