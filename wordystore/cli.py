"""The ``wordystore`` command: train, info, export, import, stitch."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from trainer.config import RunConfig


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field (``--steps``, ``--learning-rate`` ...), defaulting to the notebook."""
    for field in dataclasses.fields(RunConfig):
        if field.name == "training_args":
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = {int: int, float: float}.get(type(field.default), str)
        parser.add_argument(flag, type=kind, default=None, help=f"default: {field.default}")
    parser.add_argument("--training-arg", action="append", default=[], metavar="KEY=JSON",
                        help="extra Hugging Face TrainingArguments, e.g. --training-arg lr_scheduler_type='\"constant\"'")


def _run_config(ns: argparse.Namespace) -> RunConfig:
    data = RunConfig.from_file(ns.config).to_dict() if ns.config else {}
    for field in dataclasses.fields(RunConfig):
        value = getattr(ns, field.name, None)
        if value is not None and field.name != "training_args":
            data[field.name] = value
    extra = dict(data.get("training_args") or {})
    for item in ns.training_arg:
        key, _, value = item.partition("=")
        try:
            extra[key] = json.loads(value)
        except json.JSONDecodeError:
            extra[key] = value
    data["training_args"] = extra
    return RunConfig.from_dict(data)


def cmd_train(ns) -> None:
    from trainer.run import main_summary, train

    summary = train(ns.out, _run_config(ns), overwrite=ns.overwrite, progress=not ns.quiet)
    print(main_summary(summary))


def cmd_info(ns) -> None:
    from wordystore import trajectory

    t = trajectory.open(ns.store)
    print(t)
    if ns.config:
        print(json.dumps(t.config, indent=1))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wordystore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run the Wordybird experiment, recording every step into a trajectory")
    p.add_argument("out", help="the trajectory to create (a directory, e.g. runs/wb1b.zarr)")
    p.add_argument("--config", help="JSON file of run parameters (flags override it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing trajectory at OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_run_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("info", help="describe a trajectory")
    p.add_argument("store")
    p.add_argument("--config", action="store_true", help="also print the stored run config")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        ns.func(ns)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"wordystore {ns.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
