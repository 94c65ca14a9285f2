"""`lingshu-fast plan`: the ranked table (or JSON) of the layouts a recipe can use on N GPUs."""
from __future__ import annotations

import argparse
import json
from typing import Optional

from lingshu_fast.config import Config, ConfigError, load_config
from lingshu_fast.plan import hardware as H
from lingshu_fast.plan.layouts import LayoutPlan, plan_layouts
from lingshu_fast.plan.workload import IMAGE_TOKEN_SHARE, model_config_of, tokens_per_microbatch

MODEL_NOTE = ("a MODEL, not a measurement: memory from this trainer's tensor inventories (activation terms "
              "checked against measured tensor lifetimes on CPU), time from FLOPs at an assumed MFU plus "
              "communication over stated link bandwidths")


def assumptions(cfg: Config, hw: H.Hardware) -> dict:
    return {"mfu": H.MFU_ASSUMED[hw.card], "bf16_tflops": hw.spec.bf16_tflops, "nvlink_gb_s": hw.spec.nvlink_gb_s,
            "ib_gb_s_per_gpu": hw.spec.ib_gb_s, "link_efficiency": H.LINK_EFFICIENCY,
            "gpus_per_node": H.GPUS_PER_NODE, "reserve_fixed_gb": H.RESERVE_FIXED_GB,
            "fragmentation": H.FRAGMENTATION, "tokens_per_microbatch": tokens_per_microbatch(cfg, 1),
            "image_token_share": IMAGE_TOKEN_SHARE.get(cfg.train.stage, 0.5), "activation_dtype": "bf16"}


def _row(rank: str, p: LayoutPlan) -> list[str]:
    lay, g = p.layout, p.memory.gb()
    return [rank, f"{lay.tp}{'+sp' if lay.sequence_parallel and lay.tp > 1 else ''}", str(lay.pp), str(lay.dp),
            str(lay.vp), lay.schedule if lay.pp > 1 else "-", lay.activation_checkpointing,
            *(f"{g[k]:.1f}" for k in ("params", "grads", "optimizer", "activations", "other", "total")),
            f"{p.tokens_per_s_per_gpu:,.0f}", f"{p.step_s:.2f}", "<- recipe" if p.recipe else ""]


HEADER = ["#", "tp", "pp", "dp", "vp", "schedule", "checkpointing", "params", "grads", "optim", "activ", "other",
          "total GB", "tokens/s/GPU", "step s", ""]


def format_table(plans: list[LayoutPlan], limit: Optional[int]) -> str:
    fitting = [p for p in plans if p.fits]
    shown = fitting[:limit] if limit else fitting
    rows = [_row(str(i + 1), p) for i, p in enumerate(shown)]
    rows += [_row("-", p) for p in fitting[len(shown):] if p.recipe]
    rows += [_row("no fit", p) for p in plans if not p.fits and p.recipe]
    widths = [max(len(r[i]) for r in rows + [HEADER]) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)).rstrip() for r in [HEADER] + rows)


def render(name: str, cfg: Config, hw: H.Hardware, plans: list[LayoutPlan], limit: Optional[int] = 15) -> str:
    fitting = [p for p in plans if p.fits]
    lines = [f"lingshu-fast plan {name} on {hw.describe()}: {len(fitting)} of {len(plans)} layouts fit "
             f"(predicted peak memory per GPU in GiB, ranked by predicted tokens/s/GPU)",
             f"This is {MODEL_NOTE}: MFU {H.MFU_ASSUMED[hw.card]:.0%} of {hw.spec.bf16_tflops:g} bf16 TFLOP/s, "
             f"NVLink {hw.spec.nvlink_gb_s:g} GB/s, InfiniBand {hw.spec.ib_gb_s:g} GB/s per GPU, reserve "
             f"{H.RESERVE_FIXED_GB:g} GB + {H.FRAGMENTATION:.0%}.", ""]
    if fitting:
        lines.append(format_table(plans, limit))
        lines += ["", f"best: {fitting[0].layout.describe()} -> {fitting[0].tokens_per_s_per_gpu:,.0f} tokens/s/GPU, "
                  f"{fitting[0].memory.gb()['total']:.1f} GB per GPU"]
    else:
        smallest = min(plans, key=lambda p: p.memory.total) if plans else None
        lines.append("no layout fits" + (f"; the smallest, {smallest.layout.describe()}, needs "
                                         f"{smallest.memory.gb()['total']:.1f} GB per GPU" if smallest else ""))
    own = [p for p in plans if p.recipe]
    if own and not own[0].fits:
        lines.append(f"the recipe's own layout ({own[0].layout.describe()}) does NOT fit: "
                     f"{own[0].memory.gb()['total']:.1f} GB > {hw.memory_gb:g} GB")
    return "\n".join(lines)


def as_json(name: str, cfg: Config, hw: H.Hardware, plans: list[LayoutPlan]) -> dict:
    fitting = [p for p in plans if p.fits]
    own = [p.as_json() for p in plans if p.recipe]
    return {"recipe": name, "model": MODEL_NOTE,
            "hardware": {"gpus": hw.gpus, "gpu": hw.card, "memory_gb": hw.memory_gb},
            "assumptions": assumptions(cfg, hw), "layouts": [p.as_json() for p in plans],
            "best": fitting[0].as_json() if fitting else None, "recipe_layout": own[0] if own else None}


def plan_recipe(recipe: str, overrides: list[str], *, gpus: Optional[int] = None, card: Optional[str] = None,
                memory_gb: Optional[float] = None) -> tuple[Config, H.Hardware, list[LayoutPlan]]:
    cfg = load_config(recipe, overrides)
    hf_config = model_config_of(cfg)
    if hf_config is None:
        raise ConfigError(f"{recipe}: the planner needs the model's config: set model.architecture (one of "
                          f"qwen2.5-vl-3b/7b/32b/72b) or point model.path at a folder with config.json")
    hw = H.resolve_hardware(cfg.run.hardware, gpus, card, memory_gb)
    return cfg, hw, plan_layouts(cfg, hf_config, hw)


def main(args: argparse.Namespace) -> int:
    cfg, hw, plans = plan_recipe(args.recipe, args.overrides, gpus=args.gpus, card=args.gpu,
                                 memory_gb=args.gpu_memory_gb)
    if args.json:
        print(json.dumps(as_json(args.recipe, cfg, hw, plans), indent=1))
    else:
        print(render(args.recipe, cfg, hw, plans, limit=None if args.all else 15))
    return 0 if any(p.fits for p in plans) else 1

