"""wordystore: record training trajectories (train), inspect them (info, report, compare), convert to
and from the seed notebook's safetensors layout (export, import), and join runs (stitch)."""

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
    from wordystore import display, trajectory

    t = trajectory.open(ns.store)
    print(display.text(t))
    if ns.config:
        print(json.dumps(t.config, indent=1))


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

    steps = slice(*(int(x) if x else None for x in ns.steps.split(":"))) if ns.steps else slice(None)
    kinds = ns.kinds.split(",") if ns.kinds else None
    tokens = ns.tokens
    if tokens and tokens.replace(",", "").isdigit():
        tokens = [int(x) for x in tokens.split(",")]
    path = export(ns.store, ns.out, steps=steps, tokens=tokens, kinds=kinds, overwrite=ns.overwrite)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


def cmd_import(ns) -> None:
    from wordystore.seedfile import import_seed_file

    t = import_seed_file(ns.file, ns.store, token_masks=ns.token_masks, overwrite=ns.overwrite)
    print(t)


def cmd_stitch(ns) -> None:
    from wordystore.stitch import stitch

    t = stitch(ns.sources, ns.out, overwrite=ns.overwrite)
    print(t)
    for seg in t.segments:
        print(f"  segment rows {seg['rows'][0]}..{seg['rows'][1] - 1} steps {seg['steps'][0]}..{seg['steps'][1]} "
              f"from {seg['source']} (dropped {seg['dropped_repeated_steps']} repeated steps)")


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
    p.add_argument("--steps", help="rows as START:STOP (python slice, e.g. 0:101)")
    p.add_argument("--tokens", help="a token-set name (untrained) or comma-separated token ids")
    p.add_argument("--kinds", help="comma-separated kinds (default: all six of the notebook)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="convert a seed-layout safetensors file into a trajectory")
    p.add_argument("file")
    p.add_argument("store")
    p.add_argument("--token-masks", help="the notebook's token-mask safetensors file, stored as token sets")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("stitch", help="join trajectories along the step axis (e.g. a run and its resumption)")
    p.add_argument("sources", nargs="+", help="two or more trajectories, in order")
    p.add_argument("out", help="the trajectory to create")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_stitch)
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
