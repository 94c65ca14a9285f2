"""`lingshu-fast` command line: train, demo, export, eval.

Also runnable as `python -m lingshu_fast.cli` (what torchrun launches). Configuration mistakes are
printed as one line and exit with status 2; they never show a traceback.
"""
from __future__ import annotations

import argparse
import sys

from lingshu_fast.config import ConfigError, load_config


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.recipe, args.overrides)
    try:
        from lingshu_fast.train.loop import train
    except ImportError:
        print("lingshu-fast train: the trainer is not built yet (issue 5); config parsed OK:", cfg.run.name)
        return 3
    train(cfg)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    try:
        from lingshu_fast.demo import run_demo
    except ImportError:
        print("lingshu-fast demo: not yet — the four-stage demo lands with the trainer (issue 5).")
        return 0
    run_demo(out_dir=args.out)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    try:
        from lingshu_fast.train.export import export_checkpoint
    except ImportError:
        print("lingshu-fast export: not yet — lands with checkpoints (issue 5).")
        return 3
    export_checkpoint(args.checkpoint, args.hf_dir)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    try:
        from lingshu_fast.eval.run import main as eval_main
    except ImportError:
        print("lingshu-fast eval: not yet — lands with evaluation (issue 8).")
        return 3
    return eval_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lingshu-fast", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a recipe (YAML path or name under lingshu_fast/recipes)")
    t.add_argument("recipe")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides")
    t.set_defaults(fn=_cmd_train)
    d = sub.add_parser("demo", help="the four-stage demo on the embedded tiny model and data (CPU)")
    d.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    d.set_defaults(fn=_cmd_demo)
    e = sub.add_parser("export", help="write a Hugging Face folder from a training checkpoint")
    e.add_argument("checkpoint")
    e.add_argument("hf_dir")
    e.set_defaults(fn=_cmd_export)
    v = sub.add_parser("eval", help="evaluate a model on local benchmark files")
    v.add_argument("recipe")
    v.add_argument("overrides", nargs="*")
    v.set_defaults(fn=_cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as err:
        print(f"lingshu-fast: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
