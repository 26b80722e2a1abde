"""``wordystore convert``: rewrite a trajectory in another profile, or a format-1 or format-2 store
in today's format (3), bit for bit.

The archive profile predicts the embeddings from their moments (:class:`AdamStepPrediction`): a
store converted to it keeps its moments' predictions and adds the embeddings' with the run's
AdamW epsilon and weight decay (:func:`profile_predictions`); converted to another profile, it
drops them.

Every row is read once and encoded straight into the new store's main tier, a chunk of rows and a
shard at a time on every core, so memory stays at a few shards whatever the store's size. The
newest resume state goes along when it is the last row's (a run converted mid-way goes on with
``--resume``); older states do not.
"""

from __future__ import annotations

import numpy as np

from wordystore.errors import FormatError
from wordystore.format.keys import ATTRS_KEY, COMMIT_KEY, MAX_ROWS, STEPS_ARRAY, check_kind_name, token_set_path
from wordystore.format.kinds import Kind
from wordystore.format.layout import Profile, check_kinds
from wordystore.format.prediction import AdamPrediction, AdamStepPrediction, archive_predictions
from wordystore.read.trajectory import Trajectory
from wordystore.read.trajectory import open as open_trajectory
from wordystore.store import json_documents, storage
from wordystore.store.resume_state import ResumeState, load_state
from wordystore.write.start import create_whole


class FormatOneStore:
    """A format-1 store (wordystore 0.1), read through zarr-python: its arrays are plain zarr v3."""

    def __init__(self, where):
        import zarr

        self.store = storage.as_store(where, read_only=True)
        group = zarr.open_group(self.store, mode="r")
        meta = group.attrs[ATTRS_KEY]
        commit = json_documents.read_json(self.store, COMMIT_KEY) or {"committed_steps": 0}
        self.rows = int(commit["committed_steps"])
        if not 0 <= self.rows <= MAX_ROWS:
            raise FormatError(f"{storage.describe(self.store)}: committed_steps {self.rows} is not a count of rows")
        self.kinds = {name: Kind.from_json(spec) for name, spec in meta["kinds"].items()}
        check_kinds(self.kinds)
        self.config = meta["config"]
        self.token_sets = {
            check_kind_name(name, "token set"): group[token_set_path(name)][:] for name in meta["token_sets"]
        }
        self.predictions, self.state = {}, None
        self._arrays = {name: group[name] for name in self.kinds}
        self.steps = group[STEPS_ARRAY][: self.rows] if self.rows else np.zeros(0, np.int64)

    def read_tile(self, name: str, fetch: tuple, out: np.ndarray) -> None:
        out[...] = self._arrays[name][fetch]


class TrajectorySource:
    """A trajectory of format 2 or 3 as a source of tiles, and of its last row's resume state."""

    def __init__(self, t: Trajectory):
        self.kinds, self.config, self.token_sets, self.steps = t.kinds, t.config, t.token_sets, t.steps
        self.predictions = t.predictions
        self.read_tile = t.read_into
        states = t.commit_record.states
        self.state = None
        if states and states[-1]["row"] == len(t) - 1:
            tensors, info, step = load_state(t.store)
            self.state = ResumeState(len(t) - 1, step, tensors, info)


def open_source(where):
    """Today's trajectory or a format-1 store, as a source of tiles for :func:`convert`."""
    try:
        return TrajectorySource(open_trajectory(where, cache_bytes=0))
    except FormatError as exc:
        if "format-1" not in str(exc):
            raise
        return FormatOneStore(where)


def convert(
    source, out, *, profile: str = "compact", predictions=None, overwrite: bool = False, progress: bool = True
) -> Trajectory:
    """Write the trajectory at ``source`` to a new trajectory ``out`` in ``profile``, bit for bit.

    Parameters
    ----------
    source : str, os.PathLike or zarr store
        The trajectory to read: format 1, 2 or 3, any profile.
    out : str, os.PathLike or zarr store
        The trajectory to create.
    profile : {"compact", "portable", "archive"}
        The new store's profile (see :func:`wordystore.create`).
    predictions : mapping of str to Prediction, optional
        The predicted kinds (see :func:`wordystore.adam_predictions`); default: the source's, as
        :func:`profile_predictions` fits them to ``profile``.
    overwrite : bool
        Replace a trajectory already at ``out`` (default: refuse).
    progress : bool
        Draw a progress bar.

    Returns
    -------
    Trajectory
        The new trajectory, open for reading; its config names the source (``converted_from``).

    Examples
    --------
    >>> from wordystore.tools.convert import convert
    >>> portable = convert("runs/quick.zarr", "runs/quick-portable.zarr", profile="portable")
    >>> portable.profile
    'portable'
    """
    from tqdm.auto import tqdm

    Profile(profile)
    src = open_source(source)
    where = storage.describe(storage.as_store(source, read_only=True))
    config = {**src.config, "converted_from": where}
    if predictions is None:
        predictions = profile_predictions(profile, src.predictions, src.kinds, src.config, where)
    with (
        create_whole(
            out,
            src.kinds,
            token_sets=src.token_sets,
            config=config,
            profile=profile,
            predictions=predictions,
            overwrite=overwrite,
        ) as w,
        tqdm(total=len(src.steps), desc="convert", unit="row", disable=not progress) as bar,
    ):
        w.bulk_append(src.steps, src.read_tile, progress=bar.update)
        if src.state is not None:
            w.keep_state(src.state)
    return open_trajectory(out)


def profile_predictions(profile: str, predictions: dict, kinds: dict[str, Kind], config: dict, where: str) -> dict:
    """The predictions a store with these ``predictions``, ``kinds`` and ``config`` keeps in
    ``profile``: its moments' always; the embeddings' (:class:`AdamStepPrediction`) in the archive
    profile only, made from the moments' predictions and the run's AdamW epsilon and weight decay
    (the trainer's ``config["run"]``; an imported notebook file's weight decay, and the Hugging Face
    Trainer's default epsilon 1e-8, which the notebook keeps)."""
    moments = {name: p for name, p in predictions.items() if not isinstance(p, AdamStepPrediction)}
    if profile != "archive":
        return moments
    needed = [k for k in ("embeddings", "momentum", "variance", "learning_rate") if k not in kinds]
    if needed or not all(isinstance(moments.get(k), AdamPrediction) for k in ("momentum", "variance")):
        raise ValueError(
            f"the archive profile replays AdamW's step on the embeddings, from their moments (stored as predictions "
            f"of Adam's update) and each step's learning rate; {where} lacks "
            f"{needed or 'predictions of its momentum and variance'} (a notebook file imported with --no-predict, or "
            "without per-step learning rates, cannot be archived)"
        )
    run = config.get("run") if isinstance(config.get("run"), dict) else {}
    scalars = config.get("seed_scalars") if isinstance(config.get("seed_scalars"), dict) else {}
    eps = run.get("adam_epsilon", 1e-8)
    weight_decay = run.get("weight_decay", scalars.get("weight_decay", 0.0))
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (eps, weight_decay)):
        raise ValueError(f"{where}: the run's adam_epsilon {eps!r} and weight_decay {weight_decay!r} are not numbers")
    return archive_predictions({k: moments[k] for k in ("momentum", "variance")}, float(eps), float(weight_decay)) | {
        k: p for k, p in moments.items() if k not in ("momentum", "variance")
    }
