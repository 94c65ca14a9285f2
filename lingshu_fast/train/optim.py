"""AdamW with per-module-group learning rates over fp32 main parameters and gradients, the
distributed optimizer, the warm-up + decay schedule and the gradient norm.

Design choices:
- One AdamW for the whole model; the vision tower, the merger and the LLM are separate parameter
  groups so each keeps its own LR (Lingshu stage 1: 2e-6 vision, 1e-5 merger). Each module group is
  split once more into "decay" and "no_decay": 1-D tensors (biases, norm weights) get no weight
  decay, as in most LLM recipes (decaying a norm's gain towards 0 only hurts).
- Frozen parameters (`requires_grad=False`) are never handed to the optimizer, so they get neither
  state memory nor updates (AdamW's decoupled weight decay would otherwise still move them).
- Gradients accumulate over micro-batches in fp32 main-gradient buffers (`parallel.grad_buffer`),
  whose DP reduction overlaps the backward; `MainParamAdamW` steps fp32 main parameters (masters of
  bf16 parameters) from them. Bytes per trainable bf16 parameter: 2 (parameter) + 4 (main gradient)
  + 12 / DP (master, Adam m and v) with the distributed optimizer (`optim.distributed`), + 12
  without. fused=True on CUDA, foreach on CPU.
- The schedule's warm-up starts at lr * 1/(warmup+1), not 0 as in Hugging Face's
  `get_cosine_schedule_with_warmup`: an LR of 0 on the first step would waste that step's data.
- `grad_norm_squared` follows Megatron's counting rule so the norm does not depend on the layout.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.optim.lr_scheduler import LambdaLR

from lingshu_fast.parallel.grad_buffer import DEFAULT_BUCKET_NUMEL, GradBuffers

MODULE_GROUPS = ("vision", "merger", "llm")


def _module_group_lrs(optim_cfg) -> dict[str, float]:
    lr = float(optim_cfg.lr)
    return {
        "vision": float(optim_cfg.lr_vision) if optim_cfg.lr_vision is not None else lr,
        "merger": float(optim_cfg.lr_merger) if optim_cfg.lr_merger is not None else lr,
        "llm": lr,
    }


def build_param_groups(param_groups: dict[str, list[torch.nn.Parameter]], optim_cfg) -> list[dict]:
    """Optimizer parameter groups: per module group and decay/no-decay, trainable parameters only.

    Each group carries `name` ("vision", ...) and `decay` (bool) so logs and tests can find it.
    With nothing trainable, one empty group named "frozen" (see below).
    """
    unknown = set(param_groups) - set(MODULE_GROUPS)
    if unknown:
        raise ValueError(f"unknown module group(s) {sorted(unknown)}; expected keys among {MODULE_GROUPS}")
    lrs = _module_group_lrs(optim_cfg)
    owner: dict[int, str] = {}
    groups: list[dict] = []
    for name in MODULE_GROUPS:
        decay, no_decay = [], []
        for p in param_groups.get(name, []):
            if not p.requires_grad:
                continue
            if id(p) in owner:
                if owner[id(p)] != name:
                    raise ValueError(
                        f"a parameter of shape {tuple(p.shape)} is in both module groups "
                        f"{owner[id(p)]!r} and {name!r}; give each parameter one group"
                    )
                continue  # tied weights listed twice in one group: optimise once
            owner[id(p)] = name
            (no_decay if p.ndim <= 1 else decay).append(p)
        for params, wd, is_decay in ((decay, optim_cfg.weight_decay, True), (no_decay, 0.0, False)):
            if params:
                groups.append({"params": params, "lr": lrs[name], "weight_decay": float(wd),
                               "name": name, "decay": is_decay})
    if not groups:
        # A pipeline stage holding only frozen layers (e.g. LLM layers in stage 1 under PP) still
        # joins the schedule and the optimizer calls: give it one empty group.
        groups.append({"params": [], "lr": lrs["llm"], "weight_decay": 0.0, "name": "frozen", "decay": False})
    return groups


class MainParamAdamW(torch.optim.AdamW):
    """AdamW over this rank's share of the main parameters, with the grad buffers' main gradients.

    The main parameters are fp32: masters of bf16/fp16 parameters (small updates would otherwise round
    away in bf16: an update of lr 1e-5 relative to a weight of ~1e-2 is below bf16's resolution), or
    the fp32 parameters themselves (no copy). This rank's share is every bucket's shard under the
    distributed optimizer, everything otherwise (`GradBuffers.param_pieces`): one optimizer tensor per
    (parameter, owned range), so each keeps its parameter's group (LR, weight decay) and Adam's
    moments exist only for the owned ranges. After each step the new values are written into the
    parameter buffer and, under the distributed optimizer, all-gathered over DP (asynchronously with
    `overlap_param_gather`: forward pre-hooks wait for each module's parameters, and each pipeline
    chunk's forward hook for all of its own, such as the LM head weight the loss reads directly)."""

    def __init__(self, groups: list[dict], buffers: GradBuffers, *, overlap_param_gather: bool = False,
                 model: Optional[torch.nn.Module] = None, **kwargs):
        self.buffers, self.overlap_param_gather = buffers, overlap_param_gather
        group_of = {id(p): k for k, g in enumerate(groups) for p in g["params"]}
        self.pieces = []  # (param, buffer, lo, hi, main parameter tensor), in buffer order
        by_group: list[list] = [[] for _ in groups]
        for p, buf, lo, hi in buffers.param_pieces():
            if buf.params.dtype == torch.float32:
                main = buf.params[lo:hi]  # the parameter itself is the main parameter
            else:
                main = buf.params[lo:hi].detach().to(torch.float32)
            if buf.grads.dtype == main.dtype:
                main.grad = buf.grads[lo:hi]  # a view: the reduced main gradient, no copy
            self.pieces.append((p, buf, lo, hi, main))
            by_group[group_of[id(p)]].append(main)
        # separate fp32 masters (what a checkpoint saves as "master") unless the parameters are fp32 themselves
        self.has_masters = any(buf.params.dtype != torch.float32 for _, buf, *_ in self.pieces)
        super().__init__([{**g, "params": ps} for g, ps in zip(groups, by_group)], **kwargs)
        self.updates = 0  # optimizer steps taken (Adam's step count, the same for every tensor)
        self._prehooks = buffers.wait_before_forward(model) if overlap_param_gather and model is not None else []

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The main gradients live in the grad buffers, zeroed by `GradBuffers.zero` at each step."""

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MainParamAdamW does not take a closure")
        for _, buf, lo, hi, main in self.pieces:
            if buf.grads.dtype != main.dtype:  # optim.grad_accumulation_dtype=param: upcast for the step
                main.grad = buf.grads[lo:hi].to(main.dtype)
        super().step()
        self.updates += 1
        for _, buf, lo, hi, main in self.pieces:
            if main.data_ptr() != buf.params[lo:hi].data_ptr():
                buf.params[lo:hi].copy_(main)
        self.buffers.gather_params(async_op=self.overlap_param_gather)
        return None

    def step_tensor(self, main: torch.Tensor, updates: int) -> torch.Tensor:
        """Adam's `step` state for `main` after `updates` steps, as torch's AdamW keeps it."""
        on_device = self.defaults.get("fused") or self.defaults.get("capturable")
        return torch.tensor(float(updates), dtype=torch.float32, device=main.device if on_device else "cpu")

    def nbytes(self) -> int:
        """Bytes of optimizer state on this rank: fp32 masters (when separate) and Adam's moments."""
        total = 0
        for _, buf, lo, hi, main in self.pieces:
            if main.data_ptr() != buf.params[lo:hi].data_ptr():
                total += main.numel() * main.element_size()
            total += sum(t.numel() * t.element_size() for t in self.state.get(main, {}).values()
                         if torch.is_tensor(t) and t.dim() > 0)
        return total


def _adamw_kwargs(device: torch.device, optim_cfg) -> dict:
    kwargs = dict(lr=float(optim_cfg.lr), betas=tuple(optim_cfg.betas), eps=float(optim_cfg.eps),
                  weight_decay=float(optim_cfg.weight_decay))
    # fused on CUDA (one kernel for all tensors); foreach on CPU (the multi-tensor path there)
    kwargs.update(fused=True) if device.type == "cuda" else kwargs.update(foreach=True)
    return kwargs


def build_optimizer(param_groups: dict[str, list[torch.nn.Parameter]], optim_cfg, *, dp_group=None,
                    model: Optional[torch.nn.Module] = None, overlap_grad_reduce: bool = True,
                    bucket_numel: int = DEFAULT_BUCKET_NUMEL) -> MainParamAdamW:
    """AdamW over the trainable parameters of `param_groups` (keys vision, merger, llm), with their
    main gradients in grad buffers over `dp_group` (None: no data parallelism): sharded over DP with
    `optim.distributed` (reduce-scattered gradients, a 1/DP shard of masters and moments per rank; the
    default with DP > 1), all-reduced otherwise.
    The buffers are the optimizer's `buffers`; the trainable parameters' storage moves into them."""
    groups = build_param_groups(param_groups, optim_cfg)
    trainable = [p for g in groups for p in g["params"]]
    order = backward_order(trainable, model)
    grad_dtype = torch.float32 if optim_cfg.grad_accumulation_dtype == "fp32" else None
    distributed = optim_cfg.distributed if optim_cfg.distributed is not None else dp_group is not None
    buffers = GradBuffers(order, dp_group=dp_group, shard=distributed,
                          grad_dtype=grad_dtype or (order[0].dtype if order else torch.float32),
                          overlap=overlap_grad_reduce, bucket_numel=bucket_numel)
    device = order[0].device if order else torch.device("cpu")
    return MainParamAdamW(groups, buffers, overlap_param_gather=optim_cfg.overlap_param_gather, model=model,
                          **_adamw_kwargs(device, optim_cfg))


def backward_order(params: list[torch.nn.Parameter], model: Optional[torch.nn.Module]) -> list:
    """`params` in the order backward produces their gradients: the reverse of the model's
    registration order (the forward's: vision tower, embeddings, layers, norm, head), so the head's
    bucket fills first and the vision tower's, which a text-only micro-batch never reaches, last."""
    if model is None:
        return list(reversed(params))
    wanted = {id(p) for p in params}
    registered = [p for p in model.parameters() if id(p) in wanted]
    return list(reversed(registered))


def current_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """{module group name: current LR} (the decay and no_decay halves share it)."""
    return {g.get("name", str(i)): float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}


# --------------------------------------------------------------------------- schedule


class WarmupDecay:
    """LR multiplier at a step: linear warm-up, then cosine/linear decay to min_lr_ratio, or constant.

    A class rather than a closure so LambdaLR's state_dict stores its fields (plain numbers), which
    keeps the scheduler state loadable with torch.load(weights_only=True).
    """

    def __init__(self, warmup_steps: int, max_steps: int, schedule: str, min_lr_ratio: float):
        if schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"optim.schedule {schedule!r}: choose cosine, linear or constant")
        self.warmup_steps = int(warmup_steps)
        self.max_steps = int(max_steps)
        self.schedule = schedule
        self.min_lr_ratio = float(min_lr_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.schedule == "constant":
            return 1.0
        decay_steps = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, max(0.0, (step - self.warmup_steps) / decay_steps))
        if self.schedule == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg, max_steps: int) -> LambdaLR:
    """LambdaLR applying `WarmupDecay` to every group's own base LR (call .step() after each step)."""
    fn = WarmupDecay(optim_cfg.warmup_steps, max_steps, optim_cfg.schedule, optim_cfg.min_lr_ratio)
    return LambdaLR(optimizer, lr_lambda=[fn] * len(optimizer.param_groups))


# --------------------------------------------------------------------------- gradient norm


def _counts_on_this_rank(p: torch.Tensor, tp_rank: int) -> bool:
    # Megatron's rule: a TP-sharded parameter contributes its shard on every TP rank; a parameter
    # replicated over TP (norms, row-parallel biases) only on TP rank 0; a parameter marked `shared`
    # (e.g. an embedding tied across pipeline stages) only where it is not marked.
    if getattr(p, "shared", False):
        return False
    return bool(getattr(p, "tensor_model_parallel", False)) or tp_rank == 0


def grad_norm_squared(optimizer: MainParamAdamW, *, tp_rank: int = 0) -> torch.Tensor:
    """Sum of squared main-gradient entries this rank is responsible for, fp32 (0-d tensor): its
    owned ranges (`param_pieces`) of the parameters it counts by Megatron's rule."""
    grads = [buf.grads[lo:hi] for p, buf, lo, hi, _ in optimizer.pieces if _counts_on_this_rank(p, tp_rank)]
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    return torch.stack([n.float() for n in torch._foreach_norm(grads, 2.0)]).square().sum()
