"""`lingshu-fast` command line: train, index, demo, export, eval, plan.

Also runnable as `python -m lingshu_fast.cli` (what torchrun launches). Mistakes a user can fix -
configuration, data, checkpoints, a diverged run, an unreachable server, a full disk - are printed
as one line (a data.strict report as one block) and exit with status 2; they never show a
traceback. Under torchrun, rank 0 prints a configuration error (every rank hits the same one);
other errors may be one rank's own, so each rank prints them, prefixed with its rank.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings

from lingshu_fast.config import ConfigError, load_config

# Megatron-Core warns at import that Transformer Engine and Apex are absent; we use neither by design.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.recipe, args.overrides)  # a config error is reported before the heavy imports
    from lingshu_fast.stages import run_stage

    run_stage(cfg)
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

    export_checkpoint(args.checkpoint, args.hf_dir, overwrite=args.overwrite)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from lingshu_fast.eval.run import main as eval_main

    return eval_main(args)


def _cmd_plan(args: argparse.Namespace) -> int:
    from lingshu_fast.plan.report import main as plan_main

    return plan_main(args)


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
    e.add_argument("hf_dir", help="a new or empty folder (or a previous export, with --overwrite)")
    e.add_argument("--overwrite", action="store_true", help="replace a previous export in HF_DIR (never anything else)")
    e.set_defaults(fn=_cmd_export)
    v = sub.add_parser("eval", help="evaluate a model on local benchmark files")
    v.add_argument("recipe")
    v.add_argument("overrides", nargs="*")
    v.set_defaults(fn=_cmd_eval)
    from lingshu_fast.plan.hardware import CARDS

    q = sub.add_parser("plan", help="predict memory and tokens/s/GPU of every layout on N GPUs (a model)")
    q.add_argument("recipe")
    q.add_argument("overrides", nargs="*", help="section.key=value overrides")
    q.add_argument("--gpus", type=int, default=None, help="GPUs in all (default: the recipe's run.hardware, else 8)")
    q.add_argument("--gpu-memory-gb", type=float, default=None, help="memory per GPU in GiB (default: the card's)")
    q.add_argument("--gpu", choices=sorted(CARDS), default=None, help="the card (default: run.hardware's, else h100)")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.add_argument("--all", action="store_true", help="list every fitting layout, not the first 15")
    q.set_defaults(fn=_cmd_plan)
    return p


# (module, class, label): errors the user can act on. Looked up in sys.modules only: a module that
# was never imported cannot have raised, and the CLI stays free of heavy imports.
_USER_ERRORS = (
    ("lingshu_fast.data.formats", "DataError", "data error"),
    ("lingshu_fast.train.checkpoint", "DiskFullError", ""),  # "no space left on device: PATH (needs ~X GB ...)"
    ("lingshu_fast.train.checkpoint", "CheckpointError", "checkpoint error"),
    ("lingshu_fast.model.checkpoint_io", "CheckpointError", "checkpoint error"),
    ("lingshu_fast.train.metrics", "TrainingDiverged", ""),  # its message starts "training diverged"
    ("lingshu_fast.rl.vllm_backend", "VLLMError", "vLLM error"),
)


def user_error_message(err: BaseException) -> str | None:
    """The one-line (or one-block) message for an error the user can fix, None for a bug."""
    if isinstance(err, ConfigError):
        return f"config error: {err}"
    for module, name, label in _USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(err, cls):
            return f"{label}: {err}" if label else str(err)
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        detail = f" ({err.strerror})" if err.strerror and err.strerror != os.strerror(errno.ENOSPC) else ""
        return f"no space left on device: {err.filename or err}{detail}; free space or write elsewhere"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "index":  # files and overrides may follow the options too
        args.items += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args)
    except Exception as err:  # noqa: BLE001 - a user error becomes one line; anything else re-raises
        message = user_error_message(err)
        if message is None:
            raise
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        if rank == 0 or not isinstance(err, ConfigError):
            if world > 1 and rank != 0:  # rank 0 prints any long report once
                message = f"[rank {rank}] " + message.splitlines()[0]
            print(f"lingshu-fast: {message}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
