"""AdamW with per-module-group learning rates, the warm-up + decay schedule, ZeRO-1 and grad clipping.

Design choices:
- One AdamW for the whole model; the vision tower, the merger and the LLM are separate parameter
  groups so each keeps its own LR (Lingshu stage 1: 2e-6 vision, 1e-5 merger). Each module group is
  split once more into "decay" and "no_decay": 1-D tensors (biases, norm weights) get no weight
  decay, as in most LLM recipes (decaying a norm's gain towards 0 only hurts).
- Frozen parameters (`requires_grad=False`) are never handed to the optimizer, so they get neither
  state memory nor updates (AdamW's decoupled weight decay would otherwise still move them).
- fused=True on CUDA (one kernel for all tensors), foreach on CPU (fused has no CPU path in older
  torch and foreach is the fast multi-tensor path there).
- bf16/fp16 parameters get fp32 master weights (`MasterAdamW`): small updates would otherwise round
  away in bf16. fp32 parameters (CPU, tests) use plain AdamW.
- ZeRO-1: `torch.distributed.optim.ZeroRedundancyOptimizer` over the data-parallel group, so each DP
  rank keeps Adam moments for 1/DP of the parameters; gradients are still all-reduced in full.
- The schedule's warm-up starts at lr * 1/(warmup+1), not 0 as in Hugging Face's
  `get_cosine_schedule_with_warmup`: an LR of 0 on the first step would waste that step's data.
- `clip_grad_norm` follows Megatron's counting rule so the norm does not depend on the TP layout.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR

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


class MasterAdamW(torch.optim.AdamW):
    """AdamW that keeps fp32 master copies of low-precision (bf16/fp16) parameters.

    Why: with bf16 weights an update of lr 1e-5 relative to a weight of ~1e-2 is below bf16's
    resolution (8 mantissa bits, ~4e-3 relative) and rounds away, so training silently stalls.
    Here AdamW steps fp32 masters (its param_groups hold them) and the model's parameters get the
    rounded result after each step. Under ZeRO-1 this class is the local optimizer, so masters exist
    only for the rank's shard. The masters are part of the state dict (exact resume).
    """

    def __init__(self, params, **kwargs):
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self._model_params: list[torch.Tensor] = []
        master_groups = []
        for g in groups:
            model_params = list(g["params"])
            self._model_params.extend(model_params)
            masters = [p.detach().to(torch.float32, copy=True) for p in model_params]
            master_groups.append({**g, "params": masters})
        super().__init__(master_groups, **kwargs)

    def zero_grad(self, set_to_none: bool = True) -> None:
        # The model's parameters hold the gradients (the masters' exist only inside step()).
        for p in self._model_params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    def _masters(self) -> list[torch.Tensor]:
        return [m for g in self.param_groups for m in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterAdamW does not take a closure")
        masters = self._masters()
        for p, m in zip(self._model_params, masters):
            m.grad = None if p.grad is None else p.grad.detach().to(torch.float32)
        super().step()
        for p, m in zip(self._model_params, masters):
            p.copy_(m)
            m.grad = None  # the fp32 gradient copy lives only during the step
        return None

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["master_params"] = [m.detach().clone() for m in self._masters()]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        master_params = state_dict.pop("master_params", None)
        super().load_state_dict(state_dict)
        if master_params is None:
            raise ValueError("the optimizer state has no fp32 master weights (saved from an fp32 model?); "
                             "resume with the same model.dtype")
        with torch.no_grad():
            for p, m, saved in zip(self._model_params, self._masters(), master_params):
                m.copy_(saved)
                p.copy_(m)


def _needs_master_weights(groups: list[dict]) -> bool:
    return any(p.dtype in (torch.bfloat16, torch.float16) for g in groups for p in g["params"])


def _adamw_kwargs(groups: list[dict], optim_cfg) -> dict:
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    kwargs = dict(lr=float(optim_cfg.lr), betas=tuple(optim_cfg.betas), eps=float(optim_cfg.eps),
                  weight_decay=float(optim_cfg.weight_decay))
    kwargs.update(fused=True) if on_cuda else kwargs.update(foreach=True)
    return kwargs


def build_optimizer(param_groups: dict[str, list[torch.nn.Parameter]], optim_cfg, *,
                    dp_group: Optional[dist.ProcessGroup] = None) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters of `param_groups` (keys vision, merger, llm).

    MasterAdamW (fp32 masters) when any trainable parameter is bf16/fp16, plain AdamW otherwise.
    With `optim_cfg.zero1` and an initialised process group whose data-parallel group (`dp_group`,
    default the whole world) has more than one rank, the optimizer state is sharded over it
    (ZeroRedundancyOptimizer wrapping AdamW); otherwise a plain AdamW.
    """
    groups = build_param_groups(param_groups, optim_cfg)
    kwargs = _adamw_kwargs(groups, optim_cfg)
    adamw = MasterAdamW if _needs_master_weights(groups) else torch.optim.AdamW
    has_params = any(g["params"] for g in groups)
    if optim_cfg.zero1 and has_params and dist.is_available() and dist.is_initialized():
        group = dp_group if dp_group is not None else dist.group.WORLD
        if dist.get_world_size(group) > 1:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            dtypes = sorted({str(p.dtype) for g in groups for p in g["params"]})
            if len(dtypes) > 1:  # ZeroRedundancyOptimizer's own check says only "same dense type"
                raise ValueError(f"optim.zero1 needs every trainable parameter in one dtype, got {dtypes}; "
                                 f"set model.dtype to one type or turn optim.zero1 off")

            return ZeroRedundancyOptimizer(groups, optimizer_class=adamw, process_group=group, **kwargs)
    return adamw(groups, **kwargs)


def is_zero(optimizer: torch.optim.Optimizer) -> bool:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(optimizer, ZeroRedundancyOptimizer)


def optimizer_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """This rank's optimizer state for a per-rank checkpoint.

    Under ZeRO-1 that is the local shard only (no gather to rank 0: every rank saves its own file),
    which reloads into the same DP layout; a plain AdamW gives its usual state_dict.
    """
    if is_zero(optimizer):
        # The local AdamW only sees the scheduler's latest LRs at its next step: copy them now, or
        # the shard would be saved with the previous step's LRs.
        optimizer._sync_param_groups(optimizer.param_groups, optimizer.optim.param_groups)
        return {"zero1_local": optimizer.optim.state_dict()}
    return optimizer.state_dict()


def load_optimizer_state_dict(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of `optimizer_state_dict` (same parameters, same DP size)."""
    if is_zero(optimizer):
        if "zero1_local" not in state:
            raise ValueError("the checkpoint holds a plain AdamW state but optim.zero1 is on; "
                             "resume with the same optim.zero1 setting")
        optimizer.optim.load_state_dict(state["zero1_local"])
        # Copy the restored LRs (and scheduler keys such as initial_lr) to the exposed groups.
        optimizer._sync_param_groups(optimizer.optim.param_groups, optimizer.param_groups)
        return
    if "zero1_local" in state:
        raise ValueError("the checkpoint holds a ZeRO-1 shard but optim.zero1 is off; "
                         "resume with the same optim.zero1 setting")
    optimizer.load_state_dict(state)


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


# --------------------------------------------------------------------------- gradient clipping


def _counts_on_this_rank(p: torch.Tensor, tp_rank: int) -> bool:
    # Megatron's rule: a TP-sharded parameter contributes its shard on every TP rank; a parameter
    # replicated over TP (norms, row-parallel biases) only on TP rank 0; a parameter marked `shared`
    # (e.g. an embedding tied across pipeline stages) only where it is not marked.
    if getattr(p, "shared", False):
        return False
    return bool(getattr(p, "tensor_model_parallel", False)) or tp_rank == 0


def grad_norm_squared(params: Iterable[torch.Tensor], *, tp_rank: int = 0) -> torch.Tensor:
    """Sum of squared gradient entries this rank is responsible for, in fp32 (0-d tensor)."""
    grads = [p.grad for p in params if p.grad is not None and _counts_on_this_rank(p, tp_rank)]
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    norms = torch._foreach_norm([g.detach() for g in grads], 2.0)
    return torch.stack([n.float() for n in norms]).square().sum()


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float, *,
                   tp_group: Optional[dist.ProcessGroup] = None,
                   pp_group: Optional[dist.ProcessGroup] = None) -> float:
    """Clip gradients in place to a global L2 norm of `max_norm`; return the norm before clipping.

    The norm is the one of the whole (unsharded) model: squares are summed over this rank's
    parameters (TP-sharded ones per shard, TP-replicated ones once, see `_counts_on_this_rank`), then
    over `tp_group` and `pp_group`. Data-parallel ranks hold identical (all-reduced) gradients, so
    no DP reduction is needed. A non-finite norm is returned as is (inf/nan) and nothing is clipped,
    so the caller can skip the step. `max_norm <= 0` only measures.
    """
    params = [p for p in params if p.grad is not None]
    tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
    total_sq = grad_norm_squared(params, tp_rank=tp_rank)
    if params:
        device = params[0].grad.device
    elif torch.cuda.is_available():  # a frozen pipeline stage still joins the reduction (NCCL: CUDA)
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    total_sq = total_sq.to(device)
    for group in (tp_group, pp_group):
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(total_sq, op=dist.ReduceOp.SUM, group=group)
    total_norm = float(total_sq.sqrt())
    if not math.isfinite(total_norm) or max_norm <= 0:
        return total_norm
    clip_coef = max_norm / (total_norm + 1e-6)
    if clip_coef < 1.0 and params:
        torch._foreach_mul_([p.grad for p in params], clip_coef)
    return total_norm
