"""Running the Wordybird experiment (:mod:`trainer.experiment`) with every step recorded into a
trajectory: ``wordystore train OUT`` calls :func:`train`, ``--resume`` calls :func:`resume` and
``--extend-to N`` calls :func:`extend`.

Read top to bottom, :func:`train` is the seed notebook: inputs, model, Trainer, train; but each
step streams into a trajectory instead of RAM, and the trajectory keeps the run's full state with
its last commit, so that an interrupted run goes on bit for bit and a finished one can be extended
under a named learning-rate policy. Progress, Ctrl-C and the summary line are here too.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import math
import signal
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

import wordystore
from trainer import numerics, ranks
from trainer import state as run_state
from trainer.config import LR_POLICIES, RunConfig
from trainer.experiment import (
    Inputs,
    SeedTrainer,
    build_model,
    checkpoint_directory,
    prepare_inputs,
    training_arguments,
)
from wordystore.recording import TrajectoryCallback, kinds_for

EMBEDDING_STATE = "model.transformer.wte.weight"  # the embeddings in a saved state (trainer.state.capture)


def train(
    out: str | Path,
    cfg: RunConfig,
    *,
    overwrite: bool = False,
    progress: bool = True,
    record: bool = True,
    announce: bool | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> dict:
    """Run the experiment described by ``cfg``, recording it into a new trajectory at ``out``.
    ``record=False`` runs the same training without a store (the baseline of ``python -m bench``).
    ``announce`` (default: ``progress``) prints the run's first line, the matmul numerics and the time per
    step to expect, once two steps have run (:class:`FirstLine`). Under torchrun, each rank trains on
    its batch of ``cfg.batch_size`` sequences and rank 0 records (:mod:`trainer.ranks`).
    ``callbacks`` are added to the Trainer's (``python -m bench`` times each step with one); they
    must not change the run. Returns a summary: steps, seconds, and when recording the store, its
    rows and bytes, and ``close_seconds`` (the writer's close after the last step).

        >>> train("runs/quick.zarr", RunConfig(steps=4, vocab_size=512, hidden_dim=16))  # doctest: +SKIP
    """
    inputs = prepare_inputs(cfg)
    model = build_model(cfg, inputs.vocab_size, inputs.device)
    choice = numerics.choose(cfg.bf16_matmul, inputs.device)
    rank, size = ranks.world()
    with tempfile.TemporaryDirectory(prefix="wordystore-trainer-") as scratch:  # the Trainer's output_dir
        args = training_arguments(cfg, scratch, inputs.device)  # under torchrun, joins the process group
        numerics.install(model, choice)
        if not record:
            trainer = SeedTrainer(model=model, args=args, train_dataset=inputs.dataset, callbacks=list(callbacks))
            trainer.remove_callback(PrinterCallback)
            trainer.remove_callback(ProgressCallback)
            began = time.perf_counter()
            trainer.train()
            return {"steps": trainer.state.global_step, "seconds": time.perf_counter() - began}
        arguments = {k: v for k, v in args.to_dict().items() if k != "output_dir"}  # a temporary path
        config = run_state.jsonable(
            {
                "run": cfg.to_dict(),
                "training_arguments": arguments,
                "model": model.config.to_dict(),
                "data": inputs.data,
                "device": inputs.device,
                "numerics": choice.record(),
                **({"ranks": size} if size > 1 else {}),
            }
        )
        # the notebook keeps its logits sample and loss in bfloat16
        embeddings = {"embeddings": model.transformer.wte.weight}
        kinds = kinds_for(embeddings, inputs.vocab_size, logits_dtype="bfloat16", loss_dtype="bfloat16")
        # Recorded every step, Adam's moments compress far better as residuals of a replayed update.
        predictions = None
        if cfg.record_every == 1 and args.optim.startswith("adamw"):
            predictions = wordystore.adam_predictions(args.adam_beta1, args.adam_beta2, args.max_grad_norm or None)
        writer = ranks.on_rank_0(
            lambda: wordystore.create(
                out, kinds, token_sets=inputs.token_sets, config=config, overwrite=overwrite, predictions=predictions
            )
        )
        announced = choice if (progress if announce is None else announce) and rank == 0 else None
        return _train_recording(
            writer,
            out,
            model,
            args,
            cfg,
            inputs,
            progress=progress and rank == 0,
            announce=announced,
            callbacks=callbacks,
        )


def _train_recording(
    writer,
    out: str | Path,
    model,
    args,
    cfg,
    inputs,
    *,
    progress: bool,
    announce: numerics.Choice | None = None,
    resume_state=None,
    checkpoint=None,
    extension=None,
    start: int = 0,
    callbacks: Sequence[TrainerCallback] = (),
) -> dict:
    """Train with ``writer`` recording, the run's state saved with each commit; returns a summary.
    ``announce``: the numerics to print the run's first line about (:class:`FirstLine`), or None.
    ``writer`` is None on the ranks that do not write (:mod:`trainer.ranks`)."""
    embedding = model.transformer.wte.weight
    rows_before = writer.committed if writer is not None else None
    with writer if writer is not None else contextlib.nullcontext():
        recording = TrajectoryCallback(writer, model, {"embeddings": embedding}, cfg.record_every)
        with StopOnSignal(recording) as stop:
            trainer = SeedTrainer(
                model=model,
                args=args,
                train_dataset=inputs.dataset,
                callbacks=[recording, stop, *callbacks],
                resume_state=resume_state,
                extension=extension,
            )
            trainer.remove_callback(PrinterCallback)
            trainer.remove_callback(ProgressCallback)
            if announce is not None:  # after the recording: the time it times includes the step's recording
                trainer.add_callback(FirstLine(announce, start))
            if progress:
                trainer.add_callback(ProgressBar(recording, out, args.max_steps, initial=start))
            if writer is not None:
                writer.set_state_provider(functools.partial(_state_of, trainer, recording))
            began = time.perf_counter()
            try:
                trainer.train(resume_from_checkpoint=checkpoint)
            except RuntimeError as exc:
                if not ranks.lost_a_rank(exc):
                    raise
                rank, size = ranks.world()
                raise ValueError(
                    f"rank {rank}: another rank of the run stopped (the connection to it broke); the store keeps "
                    f"its committed steps: go on with torchrun --nproc-per-node {size} --no-python wordystore "
                    f"train {out} --resume"
                ) from None
            elapsed = time.perf_counter() - began
        steps = trainer.state.global_step
        if writer is not None:
            previous = wordystore.open(out).config.get("summary", {})
            writer.update_config(
                summary={
                    "train_seconds": round(previous.get("train_seconds", 0) + elapsed, 3),
                    "steps": steps,
                    "planned_steps": args.max_steps,
                }
            )
        closing = time.perf_counter()
    close_seconds = time.perf_counter() - closing  # the writer's close: the last rows committed and compacted
    return {
        "store": str(out),
        "start": start,
        "steps": steps,
        "planned_steps": args.max_steps,
        "stopped_by_signal": stop.signal,
        "rows": writer.committed if writer is not None else None,
        "new_rows": writer.committed - rows_before if writer is not None else None,
        "seconds": elapsed,
        "close_seconds": close_seconds,
        "steps_per_second": (steps - start) / elapsed if elapsed else math.inf,
        "store_bytes": wordystore.stored_bytes(out) if writer is not None else None,
        "n_trained": len(inputs.token_sets["trained"]),
        "n_untrained": len(inputs.token_sets["untrained"]),
    }


def _state_of(trainer: SeedTrainer, recording: TrajectoryCallback) -> tuple[dict, dict]:
    """The writer's state provider: the run's state, right after the row of its current step."""
    step = trainer.state.global_step
    if not recording.between_steps or recording.writer.last_step != step:
        raise RuntimeError(f"the run is inside step {step + 1}, not right after a recorded step: no consistent state")
    tensors, info = run_state.capture(trainer)
    info["last_lr"] = recording.last_lr if math.isfinite(recording.last_lr) else None
    return tensors, info


class ProgressBar(TrainerCallback):
    """One line: step, loss, learning rate, steps/s and the store's size on disk. The loss and learning
    rate are those recorded for the step (the scheduler has moved the optimizer's on by then); the
    Trainer's logged loss, a mean over the steps since its last log, is printed with its window."""

    def __init__(self, recording: TrajectoryCallback, store_path: str | Path, total: int, initial: int = 0):
        from tqdm.auto import tqdm

        self.recording, self.store_path = recording, store_path
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self.size_mb = 0.0
        self.logged = initial  # the last step the Trainer's logged mean covers

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % 8 == 0:  # a chunk's worth of steps: the store has grown
            self.size_mb = wordystore.stored_bytes(self.store_path) / 1e6
        self.bar.set_postfix_str(
            f"loss {recorded_loss(self.recording):.4f} lr {self.recording.last_lr:.3e} store {self.size_mb:.0f} MB"
        )
        self.bar.update(1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:  # the Trainer logs the next step's learning rate: show the one used
            window = f"steps {self.logged + 1}..{state.global_step}"
            self.bar.write(
                f"step {state.global_step:>5}  loss {recorded_loss(self.recording):.4f}  "
                f"(mean of {window}: {logs['loss']:.4f})  lr {self.recording.last_lr:.3e}"
            )
            self.logged = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def recorded_loss(recording: TrajectoryCallback) -> float:
    """The last step's loss as the store holds it (bfloat16)."""
    return torch.tensor(recording.last_loss, dtype=torch.bfloat16).item()


class FirstLine(TrainerCallback):
    """The run's first line (:func:`trainer.numerics.first_line`), printed once two real steps have
    run: the second one's time (forward, backward, optimizer, recording: the first pays for warming
    up) is the time per step to expect. A run of fewer steps prints it, without a time, at its end."""

    def __init__(self, choice: numerics.Choice, start: int):
        self.choice, self.start = choice, start
        self.last_end: float | None = None
        self.printed = False

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if not self.printed and state.global_step == self.start + 2:
            self._print(numerics.first_line(self.choice, now - self.last_end, args.max_steps - state.global_step))
        self.last_end = now

    def on_train_end(self, args, state, control, **kwargs):
        if not self.printed:
            self._print(numerics.first_line(self.choice, None))

    def _print(self, line: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(line)  # above a progress bar, if one is drawn
        self.printed = True


class StopOnSignal(TrainerCallback):
    """SIGINT (Ctrl-C) or SIGTERM: finish the step under way, stop at the next recorded step, commit.

    The store then holds that step's state, and ``--resume`` goes on from it. A second signal
    stops at once (the last commit's state is kept). Only the main thread can install handlers;
    elsewhere this does nothing.
    """

    def __init__(self, recording: TrajectoryCallback):
        self.recording = recording
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def on_step_end(self, args, state, control, **kwargs):
        # every rank stops at the same step: the first recorded one after a signal to any of them
        if ranks.any_rank(self.signal is not None) and self.recording.recorder.records(state.global_step):
            control.should_training_stop = True


def resume(
    out: str | Path, *, overrides: dict | None = None, progress: bool = True, announce: bool | None = None
) -> dict:
    """Go on with the interrupted run at ``out`` to its planned last step, bit for bit.

    ``overrides`` are run parameters given again (e.g. by command-line flags); any that differ
    from the stored run's are refused, as is a corpus or tokenizer that changed since.
    """
    cfg, inputs, config, (tensors, info, step) = _reopen(out, overrides)
    planned, extension = planned_steps(config)
    if step >= planned:
        raise ValueError(f"{out}: the run is finished (step {step} of {planned}); --extend-to N goes on past it")
    return _go_on(out, cfg, inputs, tensors, info, step, planned, extension, progress, announce=announce)


def extend(
    out: str | Path,
    to_step: int,
    lr_policy: str,
    *,
    overrides: dict | None = None,
    progress: bool = True,
    announce: bool | None = None,
) -> dict:
    """Go on with the finished run at ``out`` up to step ``to_step`` under a named LR policy.

    ``lr_policy`` is one of :data:`LR_POLICIES`. Everything else (parameters, Adam's moments,
    RNGs, data order) goes on exactly; the store's config gets an ``extensions`` record with the
    policy and the seam (the step the extension starts from), for analysis and comparison tools.
    """
    if lr_policy not in LR_POLICIES:
        raise ValueError(f"unknown LR policy {lr_policy!r}; expected one of {sorted(LR_POLICIES)}")
    cfg, inputs, config, (tensors, info, step) = _reopen(out, overrides)
    planned, _ = planned_steps(config)
    if step < planned:
        raise ValueError(f"{out}: the run stopped at step {step} of {planned}; finish it first with --resume")
    if not isinstance(to_step, int) or to_step <= step:
        raise ValueError(f"--extend-to must be a step after the run's last step {step}, got {to_step}")
    extension = {
        "seam_step": step,
        "to_step": to_step,
        "lr_policy": lr_policy,
        "lr_policy_means": LR_POLICIES[lr_policy],
        "seam_lr": info["last_lr"],
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    return _go_on(
        out, cfg, inputs, tensors, info, step, to_step, extension, progress, new_extension=True, announce=announce
    )


def planned_steps(config: dict) -> tuple[int, dict | None]:
    """The step a stored run is to reach, and the extension it is in (None: the original plan)."""
    extensions = config.get("extensions") or []
    if extensions:
        return extensions[-1]["to_step"], extensions[-1]
    return config["run"]["steps"], None


def _reopen(out, overrides: dict | None) -> tuple[RunConfig, Inputs, dict, tuple[dict, dict, int]]:
    """The stored run's parameters (``overrides`` must agree with them), its inputs checked against
    the stored fingerprint, the store's config, and its newest state ``(tensors, info, step)``."""
    t = wordystore.open(out)
    if "run" not in t.config:
        raise ValueError(f"{out} was not recorded by wordystore train: it has no run config to go on with")
    saved = _saved_state(out, t)  # first: nothing is built for a run that cannot go on
    stored = RunConfig.from_dict(t.config["run"])
    overrides = dict(overrides or {})
    numerics.check_given(t.config, overrides.pop("bf16_matmul", None))  # the run keeps its numerics
    given = RunConfig.from_dict({**stored.to_dict(), **overrides}).to_dict()
    differences = [f"{k}: stored {v!r}, given {given[k]!r}" for k, v in stored.to_dict().items() if given[k] != v]
    if differences:
        raise ValueError(
            f"{out} was recorded with other parameters ({'; '.join(differences)}); "
            "leave them out to go on with the stored ones"
        )
    inputs = prepare_inputs(stored)
    stored_ranks, size = t.config.get("ranks", 1), ranks.world()[1]
    if stored_ranks != size:
        raise ValueError(
            f"{out} was recorded on {stored_ranks!r} rank(s) and this run has {size}: each step's batch would "
            f"differ; go on with torchrun --nproc-per-node {stored_ranks!r}"
        )
    then = {**t.config["data"], "device": t.config.get("device")}
    now = {**inputs.data, "device": inputs.device}
    changed = [f"{k}: stored {v!r}, now {now.get(k)!r}" for k, v in then.items() if now.get(k) != v]
    if changed:
        raise ValueError(f"{out}: the run's inputs changed since it was recorded ({'; '.join(changed)})")
    return stored, inputs, t.config, saved


def _saved_state(out, t: wordystore.Trajectory) -> tuple[dict, dict, int]:
    """The newest state the store at ``out`` keeps, checked against its last row; else why there is none."""
    saved = wordystore.load_state(out)
    if saved is None and len(t) == 0:
        raise ValueError(
            f"{out}: the run stopped before its first commit (the writer commits a block of steps, with "
            "the run's state, every few steps), so nothing of it was kept to go on from; start it "
            f"again: wordystore train {out} --overwrite, with the same flags"
        )
    if saved is None and "imported_from" in t.config:
        raise ValueError(
            f"{out} was imported from {t.config['imported_from']}: a run's saved training state does not "
            "travel through the notebook's layout, so it cannot go on; train it again to extend it"
        )
    if saved is None:
        raise ValueError(
            f"{out} holds no saved training state (written by stitch, converted from a store whose "
            "newest state was not its last row's, or by a wordystore from before resume states); "
            "cannot go on"
        )
    if saved[2] != int(t.steps[-1]):
        raise ValueError(
            f"{out}: the saved state is for step {saved[2]}, the last committed row for step {int(t.steps[-1])}"
        )
    restored, recorded = saved[0].get(EMBEDDING_STATE), t.embeddings[len(t) - 1]
    if (
        restored is None
        or restored.shape != recorded.shape
        or restored.dtype != recorded.dtype
        or not torch.equal(restored.view(torch.int16), recorded.view(torch.int16))
    ):
        raise ValueError(
            f"{out}: the saved state's embedding parameters are not the store's last embeddings row "
            f"(step {saved[2]}) bit for bit: the state is not this run's; `wordystore verify {out}` "
            "checks the store"
        )
    return saved


def _go_on(
    out, cfg, inputs, tensors, info, step, to_step, extension, progress, *, new_extension=False, announce=None
) -> dict:
    """Rebuild the run, restore ``(tensors, info)`` at ``step``, and train on to ``to_step``."""
    model = build_model(cfg, inputs.vocab_size, inputs.device)  # its parameters are then overwritten
    choice = numerics.of_stored_run(wordystore.open(out).config, inputs.device)
    rank = ranks.world()[0]
    announce = (progress if announce is None else announce) and rank == 0
    with tempfile.TemporaryDirectory(prefix="wordystore-trainer-") as scratch:
        args = training_arguments(cfg, scratch, inputs.device, max_steps=to_step)  # joins the process group
        numerics.install(model, choice)
        checkpoint = checkpoint_directory(Path(scratch) / "resume", info)
        writer = ranks.on_rank_0(functools.partial(_resume_writer, out, extension if new_extension else None))
        return _train_recording(
            writer,
            out,
            model,
            args,
            cfg,
            inputs,
            progress=progress and rank == 0,
            announce=choice if announce else None,
            resume_state=(tensors, info),
            checkpoint=checkpoint,
            extension=extension,
            start=step,
        )


def _resume_writer(out, new_extension: dict | None) -> wordystore.TrajectoryWriter:
    """The stored run's writer, going on; with ``new_extension`` added to its config's extensions."""
    writer = wordystore.resume(out)
    if new_extension is not None:
        stored = wordystore.open(out).config
        writer.update_config(extensions=[*(stored.get("extensions") or []), new_extension])
    return writer


def main_summary(summary: dict) -> str:
    """The command's last line."""
    if summary["start"]:
        steps = f"steps {summary['start'] + 1}..{summary['steps']}"
        rows = f"{summary['new_rows']} new rows ({steps}; {summary['rows']} in all)"
    else:
        rows = f"{summary['rows']} rows ({summary['steps']} steps)"
    line = (
        f"recorded {rows} into {summary['store']} "
        f"in {summary['seconds']:.1f} s ({summary['steps_per_second']:.2f} steps/s); "
        f"store {summary['store_bytes'] / 1e6:.1f} MB on disk; "
        f"token sets: {summary['n_trained']} trained, {summary['n_untrained']} untrained"
    )
    if summary["steps"] < summary["planned_steps"]:
        size = ranks.world()[1]
        launch = f"torchrun --nproc-per-node {size} --no-python " if size > 1 else ""
        line += (
            f"\nstopped at step {summary['steps']} of {summary['planned_steps']}; "
            f"go on with: {launch}wordystore train {summary['store']} --resume"
        )
    return line
