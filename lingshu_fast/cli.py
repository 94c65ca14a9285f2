"""`lingshu-fast` command line: train, index, demo, export, eval.

Also runnable as `python -m lingshu_fast.cli` (what torchrun launches). Configuration mistakes are
printed as one line and exit with status 2; they never show a traceback.
"""
from __future__ import annotations

import argparse
import sys
import warnings

from lingshu_fast.config import ConfigError, load_config
from lingshu_fast.data.formats import DataError

# Megatron-Core warns at import that Transformer Engine and Apex are absent; we use neither by design.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.recipe, args.overrides)
    if cfg.train.stage == 4:
        from lingshu_fast.rl.loop import train_rl

        train_rl(cfg)
        return 0
    from lingshu_fast.train.loop import train

    train(cfg)
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    """Build (or check) the data index of JSONL files once, before a run (see data/index.py)."""
    import time

    from lingshu_fast.data.dataset import open_parts
    from lingshu_fast.data.template import ChatTemplate
    from lingshu_fast.data.tokenizer import load_tokenizer

    files = [a for a in args.items if "=" not in a]
    cfg = load_config(args.recipe, [a for a in args.items if "=" in a])
    files = files or list(cfg.data.train)
    if not files:
        raise ConfigError("lingshu-fast index: give JSONL files, or a --recipe whose data.train names them")
    template = ChatTemplate(load_tokenizer(cfg.data.tokenizer), cfg.data.system_prompt)
    mode = "prompt" if args.prompts or cfg.train.stage == 4 else "train"
    for path in files:
        start = time.perf_counter()
        part = open_parts([path], template, cfg.data, mode=mode, backend=args.scanner)[0]
        header, took_s = part.header, time.perf_counter() - start
        bad = {k: v for k, v in header["bad_counts"].items() if v}
        built = f"built in {header['build_s']:.1f} s ({header['scanner']} scanner)" if took_s >= header["build_s"] else ""
        print(f"{path}: {header['num_records']} usable records, {int(part.text_tokens.sum())} text tokens, "
              f"{len(part.image_hw)} images; skipped {bad or 'none'}; {built or 'index was fresh'} -> {part.index_path}")
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
    x = sub.add_parser("index", help="build the data index of JSONL files once (training builds it on first use)")
    x.add_argument("items", nargs="*", help="JSONL files and section.key=value overrides (data.tokenizer=..., "
                                            "data.image_root=..., data.index_dir=...)")
    x.add_argument("--recipe", default=None, help="take data.* settings (and data.train) from this recipe")
    x.add_argument("--prompts", action="store_true", help="RL prompt records (default for a stage-4 recipe)")
    x.add_argument("--scanner", choices=["auto", "native", "python"], default="auto",
                   help="JSONL scanner: native (lingshu_fast._C) when built, else Python")
    x.set_defaults(fn=_cmd_index)
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
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "index":  # files and overrides may follow the options too
        args.items += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args)
    except ConfigError as err:
        print(f"lingshu-fast: config error: {err}", file=sys.stderr)
        return 2
    except DataError as err:  # names the file:line and what to do; a traceback adds nothing
        print(f"lingshu-fast: data error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
