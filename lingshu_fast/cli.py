"""`lingshu-fast` command line: train, demo, export, eval, plan.

Also runnable as `python -m lingshu_fast.cli` (what torchrun launches). Configuration mistakes are
printed as one line and exit with status 2; they never show a traceback.
"""
from __future__ import annotations

import argparse
import sys
import warnings

from lingshu_fast.config import ConfigError, load_config

# Megatron-Core warns at import that Transformer Engine and Apex are absent; we use neither by design.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def _cmd_train(args: argparse.Namespace) -> int:
    from lingshu_fast.stages import run_stage

    run_stage(load_config(args.recipe, args.overrides))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from lingshu_fast.demo import run_demo

    run_demo(out_dir=args.out, extra_overrides=[f"train.max_steps={args.max_steps}"] if args.max_steps else None)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from lingshu_fast.train.export import export_checkpoint

    export_checkpoint(args.checkpoint, args.hf_dir)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from lingshu_fast.eval.run import main as eval_main

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
    d.add_argument("--max-steps", type=int, default=0, help="steps per stage (default: each recipe's)")
    d.set_defaults(fn=_cmd_demo)
    e = sub.add_parser("export", help="write a Hugging Face folder from a training checkpoint")
    e.add_argument("checkpoint")
    e.add_argument("hf_dir")
    e.set_defaults(fn=_cmd_export)
    v = sub.add_parser("eval", help="evaluate a model on local benchmark files")
    v.add_argument("recipe")
    v.add_argument("overrides", nargs="*")
    v.set_defaults(fn=_cmd_eval)
    from lingshu_fast.plan.report import add_parser as add_plan_parser

    add_plan_parser(sub)
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
