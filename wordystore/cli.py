"""wordystore: record training trajectories (train), inspect them (info, report, compare), check them
(verify), convert to and from the seed notebook's safetensors layout (export, import), join runs
(stitch), and hand their scalars to TensorBoard (export-scalars).

A store is a directory or an s3://, gs:// or az:// URL (endpoint and credentials from the environment:
AWS_*, GOOGLE_*, AZURE_*, ~/.aws with boto3; docs/scale.md).

A mistake in what was asked for (a missing store, a bad flag value, a full disk) prints one line,
"wordystore COMMAND: error: what was wrong; what was expected", and exits with status 2. Set
WORDYSTORE_DEBUG=1, or pass --debug, to see the traceback too. docs/errors.md lists the errors.
Progress bars are drawn on a terminal only (--quiet: never); --json makes info, verify and compare
print one JSON document.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path

from wordystore.commands import check_mask_file, examples, progress
from wordystore.errors import WordystoreError
from wordystore.version import __version__

# Building the parser imports nothing heavy (torch, zarr's codecs, the format): `wordystore --help`
# stays quick. Each command imports what it needs when it runs.

# What a user can get wrong: their own input, the store they point at, the disk. Other exceptions
# are bugs, reported as such (exit status 1).
USER_ERRORS = (WordystoreError, OSError, ValueError, KeyError, IndexError)
EXIT_USER_ERROR, EXIT_BUG, EXIT_BROKEN_PIPE = 2, 1, 141  # 141: as a process killed by SIGPIPE
COMMANDS = "wordystore.commands"  # entry points adding commands: register(subparsers) (the trainer's `train`)


class Parser(argparse.ArgumentParser):
    """argparse, with its usage errors on one line as every other error, and each command's
    examples (its epilog) shown as written."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Later(Sequence):
    """``module.name``, a sequence imported the first time argparse reads it (a flag's ``choices``):
    flags list what the format defines without ``wordystore --help`` importing the format."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    @functools.cached_property
    def _items(self) -> tuple:
        return tuple(getattr(importlib.import_module(self.module), self.name))

    def __getitem__(self, index):
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items)


def warn(ns, message: str) -> None:
    print(f"wordystore {ns.command}: warning: {message}", file=sys.stderr)


def print_json(document) -> None:
    print(json.dumps(document, indent=1, allow_nan=False))


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
    from wordystore.format.keys import NAME_PATTERN

    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        if NAME_PATTERN.match(text):
            return text
    raise argparse.ArgumentTypeError(
        f"expected a token-set name (e.g. untrained) or comma-separated token ids; got {text!r}"
    )


# -- commands ---------------------------------------------------------------------------------------


def cmd_info(ns) -> None:
    from wordystore.read import display, trajectory

    t = trajectory.open(ns.store)
    if ns.json:
        print_json(display.info_dict(t))
        return
    print(display.info_text(t))
    if ns.config:
        print(json.dumps(t.config, indent=1))


def cmd_verify(ns) -> int:
    from wordystore.check.verification import verify

    report = verify(ns.store, repair=ns.repair, progress=progress(ns))
    if ns.json:
        print_json(report.to_dict())
    else:
        print(report.summary())
    return report.exit_status


def _plots_drawn(ns, written: str) -> bool:
    """Whether plots could be drawn; if not, a warning naming the file written without them, and why."""
    from wordystore.analysis.report import plots_missing

    why = plots_missing()
    if why:
        warn(ns, f"wrote {written} without its plots: {why}")
    return why is None


def cmd_report(ns) -> None:
    from wordystore.analysis.report import write_report

    path = write_report(ns.store, ns.out, progress=progress(ns))
    print(f"wrote {path}" + " and its plots" * _plots_drawn(ns, str(path)))


def cmd_compare(ns) -> None:
    from wordystore.analysis.report import write_comparison

    comparison = write_comparison(ns.a, ns.b, ns.out, progress=progress(ns))
    written = Path(comparison.out) / "compare.md"
    drawn = _plots_drawn(ns, str(written))
    if ns.json:
        print_json(comparison.to_dict())
    else:
        print(f"{comparison.text()}\n\nwrote {written}" + " and its plots" * drawn)


def cmd_export(ns) -> None:
    from wordystore.tools.safetensors_layout import export

    kinds = ns.kinds.split(",") if ns.kinds else None
    path = export(
        ns.store,
        ns.out,
        rows=ns.rows,
        steps=ns.steps,
        tokens=ns.tokens,
        kinds=kinds,
        overwrite=ns.overwrite,
        progress=progress(ns),
    )
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


def cmd_import(ns) -> None:
    from wordystore.tools.safetensors_layout import import_seed_file

    if ns.token_masks is not None:
        check_mask_file("--token-masks", ns.token_masks)
    from wordystore.store.storage import size

    t = import_seed_file(
        ns.file, ns.store, token_masks=ns.token_masks, overwrite=ns.overwrite, progress=progress(ns), predict=ns.predict
    )
    steps = f"steps {t.steps[0]}..{t.steps[-1]}" if len(t) else "no steps"
    print(f"wrote {ns.store} ({len(t)} rows, {steps}; {size(t.store) / 1e6:.1f} MB)")  # one line, as export


def cmd_stitch(ns) -> None:
    from wordystore.tools.stitch import stitch

    t = stitch(ns.sources, ns.out, overwrite=ns.overwrite, progress=progress(ns))
    print(t)
    for seg in t.segments:
        print(
            f"  segment rows {seg['rows'][0]}..{seg['rows'][1] - 1} steps {seg['steps'][0]}..{seg['steps'][1]} "
            f"from {seg['source']} (dropped {seg['dropped_repeated_steps']} repeated steps)"
        )


def cmd_convert(ns) -> None:
    from wordystore.tools.convert import convert

    t = convert(ns.store, ns.out, profile=ns.profile, overwrite=ns.overwrite, progress=progress(ns))
    print(t)


def cmd_export_scalars(ns) -> None:
    from wordystore.tools.scalars import export_scalars

    written = export_scalars(ns.store, ns.tensorboard, progress=progress(ns))
    print(
        f"wrote {sum(written.values())} scalars ({', '.join(f'{tag} {n}' for tag, n in written.items())}) "
        f"into {ns.tensorboard}"
    )


def cmd_completion(ns) -> None:
    from wordystore.optional import require

    require("shtab", "completion", "shell completion")
    import shtab

    print(shtab.complete(build_parser(), ns.shell))


# -- the parser -------------------------------------------------------------------------------------


def _store(p, what: str = "the trajectory to read") -> None:
    p.add_argument("store", help=f"{what} (a directory such as runs/wb1b.zarr, or an s3://, gs:// or az:// URL)")


def _overwrite(p, what: str) -> None:
    p.add_argument("--overwrite", action="store_true", help=f"replace an existing {what} (default: refuse)")


def _quiet(p) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bar (one is drawn only on a terminal anyway)")


def _json(p, what: str) -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} as one JSON document (for scripts)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="wordystore", description=__doc__)
    parser.add_argument("--version", action="version", version=f"wordystore {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or WORDYSTORE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in entry_points(group=COMMANDS):  # first: `train` heads the list of commands
        command.load()(sub)

    p = sub.add_parser(
        "info",
        help="describe a trajectory: kinds, shapes, steps, sizes, token sets, config",
        epilog=examples(
            "wordystore info runs/wb1b.zarr",
            "wordystore info runs/wb1b.zarr --config      # also the whole stored config",
            "wordystore info runs/wb1b.zarr --json | jq .kinds.embeddings",
        ),
    )
    _store(p)
    p.add_argument("--config", action="store_true", help="also print the stored run config (JSON)")
    _json(p, "the description, config included,")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "verify",
        help="check every chunk of a trajectory's committed rows; --repair rebuilds its "
        "commit record from the rows that verify (exit status 1: damage found)",
        epilog=examples(
            "wordystore verify runs/wb1b.zarr",
            "wordystore verify runs/wb1b.zarr --repair",
            "wordystore verify runs/wb1b.zarr --json --quiet > verify.json",
        ),
    )
    _store(p, "the trajectory to check")
    p.add_argument(
        "--repair",
        action="store_true",
        help="rebuild the commit record (and documents the metadata determines) from what verifies; "
        "deletes nothing, keeps the old record as commit.json.<time>.bak",
    )
    _json(p, "the outcome (problems, repair) instead of the summary")
    _quiet(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "report",
        help="report.md and PNG plots of a trajectory (the plots need the analysis extra)",
        epilog=examples(
            "wordystore report runs/wb1b.zarr                # into ./wb1b-report",
            "wordystore report runs/wb1b.zarr --out reports/wb1b",
        ),
    )
    _store(p, "the trajectory to analyse")
    p.add_argument("--out", help="directory to write into (default: ./<store name>-report)")
    _quiet(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "compare",
        help="two trajectories' config and learning-rate differences, and their plots overlaid",
        epilog=examples(
            "wordystore compare runs/a.zarr runs/b.zarr      # into ./a-vs-b",
            "wordystore compare runs/a.zarr runs/b.zarr --json | jq .config_differences",
        ),
    )
    p.add_argument("a", help="the first trajectory (A)")
    p.add_argument("b", help="the second trajectory (B)")
    p.add_argument("--out", help="directory to write compare.md and the plots into (default: ./<a>-vs-<b>)")
    _json(p, "the comparison")
    _quiet(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "export",
        help="write a trajectory in the seed notebook's single-safetensors layout",
        epilog=examples(
            "wordystore export runs/wb1b.zarr wb1b.safetensors",
            "wordystore export runs/wb1b.zarr last.safetensors --steps 190: --tokens untrained",
            "wordystore export runs/wb1b.zarr emb.safetensors --rows 0:101 --kinds embeddings,losses",
        ),
    )
    _store(p, "the trajectory to export")
    p.add_argument("out", help="the .safetensors file to write (written aside, renamed into place at the end)")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--steps",
        type=selection,
        metavar="SELECTION",
        help="training steps, as .loc: 100:200 is steps 100 to 200 inclusive, 150 one step, "
        "0:200:10 every 10th row, 0,50,100 a list (default: all)",
    )
    which.add_argument(
        "--rows",
        type=selection,
        metavar="SELECTION",
        help="rows, as a python slice: 0:101 is the first 101 rows, --rows=-10: the last 10 (default: all)",
    )
    p.add_argument(
        "--tokens",
        type=token_selection,
        help="a token-set name (untrained) or comma-separated token ids (default: every token)",
    )
    p.add_argument("--kinds", help="comma-separated kinds (default: all six of the notebook)")
    _overwrite(p, "file at OUT")
    _quiet(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "import",
        help="convert a seed-layout safetensors file into a trajectory",
        epilog=examples(
            "wordystore import 1.12f_wordybird_1b.safetensors runs/wb1b.zarr",
            "wordystore import wb1b.safetensors runs/wb1b.zarr --token-masks fineweb_token_masks.safetensors",
        ),
    )
    p.add_argument(
        "file", help="the .safetensors file, in the notebook's layout (as written by the notebook or export)"
    )
    p.add_argument("store", help="the trajectory to create")
    p.add_argument(
        "--token-masks",
        help="the notebook's token-mask safetensors file, stored as token sets "
        "(default: those the file's metadata carries, if any)",
    )
    p.add_argument(
        "--no-predict",
        dest="predict",
        action="store_false",
        help="store Adam's moments as they are, not as residuals of a replayed update (default: the "
        "smaller of the options measured on a sample, about 1.7x smaller in all on the seed run)",
    )
    _overwrite(p, "trajectory at STORE")
    _quiet(p)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "stitch",
        help="join a run and its continuations along the step axis (in step order)",
        epilog=examples("wordystore stitch runs/wb1.zarr runs/wb3.zarr runs/wb1+3.zarr"),
    )
    p.add_argument("sources", nargs="+", help="two or more trajectories (joined in the order of their first step)")
    p.add_argument("out", help="the trajectory to create")
    _overwrite(p, "trajectory at OUT")
    _quiet(p)
    p.set_defaults(func=cmd_stitch)

    p = sub.add_parser(
        "convert",
        help="rewrite a trajectory in another profile, or a format-1 or -2 store in today's format",
        epilog=examples(
            "wordystore convert runs/wb1b.zarr runs/wb1b-portable.zarr --profile portable",
            "wordystore convert runs/wb1b.zarr runs/wb1b-archive.zarr --profile archive",
        ),
    )
    _store(p, "the trajectory to rewrite")
    p.add_argument("out", help="the trajectory to create")
    p.add_argument(
        "--profile",
        choices=Later("wordystore.format.layout", "PROFILES"),
        default="compact",
        metavar="PROFILE",
        help="compact: pcodec, small and fast (default); portable: standard zarr codecs, read by tensorstore; "
        "archive: compact with the embeddings replayed from their moments too, the smallest, reading them "
        "several times slower",
    )
    _overwrite(p, "trajectory at OUT")
    _quiet(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "export-scalars",
        help="write a trajectory's scalar kinds (loss, learning rate, gradient norms) "
        "as TensorBoard event files (needs the tensorboard extra)",
        epilog=examples("wordystore export-scalars runs/wb1b.zarr --tensorboard tb/wb1b", "tensorboard --logdir tb"),
    )
    _store(p, "the trajectory whose scalars to export")
    p.add_argument(
        "--tensorboard",
        required=True,
        metavar="DIR",
        help="the TensorBoard log directory to write an event file into (created if need be)",
    )
    _quiet(p)
    p.set_defaults(func=cmd_export_scalars)

    p = sub.add_parser(
        "completion",
        help="print a shell completion script (needs the completion extra: shtab)",
        epilog=examples(
            "wordystore completion bash > ~/.local/share/bash-completion/completions/wordystore",
            "wordystore completion zsh > ~/.zfunc/_wordystore",
        ),
    )
    p.add_argument("shell", choices=("bash", "zsh", "tcsh"), help="the shell to complete in")
    p.set_defaults(func=cmd_completion)

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
        with warnings.catch_warnings():  # a warning is one line too: "wordystore COMMAND: warning: ..."
            warnings.showwarning = lambda message, *_, **__: warn(ns, " ".join(str(message).split()))
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
        print(
            f"{prefix} internal error, {type(exc).__name__}: {error_line(exc)} "
            "(a bug in wordystore: please report it with the traceback that WORDYSTORE_DEBUG=1 shows)",
            file=sys.stderr,
        )
        return EXIT_BUG
    return status


if __name__ == "__main__":
    sys.exit(main())
