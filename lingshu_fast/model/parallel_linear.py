"""Megatron-Core's tensor-parallel layers, adapted to our packed [T, hidden] activations.

Megatron's layers expect [sequence, batch, hidden]; a packed batch is one long sequence, so we add
and drop a batch dimension of 1 around each call. Subclassing (rather than wrapping) keeps the
parameter names `weight` / `bias`, which checkpoint_io maps to Hugging Face names.

Sharding (contiguous blocks per TP rank, rank r of tp):
- ColumnLinear: weight rows [r*out/tp, (r+1)*out/tp) and the same bias rows; output stays sharded
  unless gathered.
- RowLinear: weight columns [r*in/tp, ...); input arrives sharded; outputs are summed over TP
  (all-reduce), then the (replicated) bias is added once.
- VocabEmbedding: vocabulary rows [r*V/tp, (r+1)*V/tp); out-of-shard ids give zeros before the
  all-reduce.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel

from lingshu_fast.model.sequence_parallel import gather_seq, reduce_scatter_seq


class ColumnLinear(tensor_parallel.ColumnParallelLinear):
    def __init__(self, in_features: int, out_features: int, *, bias: bool, config, skip_weight: bool = False):
        super().__init__(
            in_features, out_features, config=config, init_method=_no_init, bias=bias, gather_output=False,
            skip_weight_param_allocation=skip_weight, tp_group=_tp_group(),
        )
        _mark_sharded(self.weight, dim=0)

    sequence_parallel = False  # set by the model: input arrives as this rank's slice of the sequence

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None, gather_output: bool = False) -> torch.Tensor:
        if self.sequence_parallel:
            return F.linear(gather_seq(x, self.tp_group), self.weight if weight is None else weight, self.bias)
        out, _ = super().forward(x.unsqueeze(1), weight=weight, runtime_gather_output=False)
        out = out.squeeze(1)
        if gather_output and self.tp_group.size() > 1:
            out = _GatherLastDim.apply(out, self.tp_group)
        return out


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dim; backward keeps this rank's slice. Megatron's own gather
    allocates on torch.cuda.current_device(), so it cannot run on CPU/gloo."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(group.size())]
        torch.distributed.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        rank = torch.distributed.get_rank(ctx.group)
        return grad.chunk(ctx.group.size(), dim=-1)[rank].contiguous(), None


class RowLinear(tensor_parallel.RowParallelLinear):
    def __init__(self, in_features: int, out_features: int, *, bias: bool, config):
        super().__init__(
            in_features, out_features, config=config, init_method=_no_init, bias=bias, input_is_parallel=True,
            skip_bias_add=False, tp_group=_tp_group(),
        )
        _mark_sharded(self.weight, dim=1)

    sequence_parallel = False  # set by the model: output leaves as this rank's slice of the sequence

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            out = reduce_scatter_seq(F.linear(x, self.weight), self.tp_group)
            return out + self.bias if self.bias is not None else out
        out, _ = super().forward(x.unsqueeze(1))
        return out.squeeze(1)


class VocabEmbedding(tensor_parallel.VocabParallelEmbedding):
    def __init__(self, vocab_size: int, hidden_size: int, *, config):
        super().__init__(vocab_size, hidden_size, init_method=_no_init, config=config, tp_group=_tp_group())
        _mark_sharded(self.weight, dim=0)


class ReplicatedLinear(torch.nn.Linear):
    """A whole (unsharded) linear layer with the TP layers' call signature: the vision tower when
    TP does not divide its dimensions. Every TP rank computes the same thing; its gradients come
    out identical on every rank because its output's gradient does."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype: torch.dtype):
        super().__init__(in_features, out_features, bias=bias, dtype=dtype)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None, gather_output: bool = False) -> torch.Tensor:
        return F.linear(x, self.weight if weight is None else weight, self.bias)


def make_linear(kind: str, in_features: int, out_features: int, *, bias: bool, config, sharded: bool):
    """`kind` "column" or "row"; `sharded=False` gives a ReplicatedLinear."""
    if not sharded:
        return ReplicatedLinear(in_features, out_features, bias=bias, dtype=config.params_dtype)
    layer = ColumnLinear if kind == "column" else RowLinear
    return layer(in_features, out_features, bias=bias, config=config)


def _tp_group():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group()


def _mark_sharded(weight, dim: int) -> None:
    """Megatron's TP attributes (`tensor_model_parallel`, `partition_dim`, `partition_stride`), which
    its layers set only when they initialise weights themselves (we pass perform_initialization=False).
    The gradient-norm rule counts a parameter on every TP rank only when it carries them."""
    if weight is not None:
        tensor_parallel.set_tensor_model_parallel_attributes(weight, True, dim, 1)


def _no_init(weight: torch.Tensor) -> None:
    """Weights are filled by checkpoint_io (from safetensors or a layout-independent random init)."""
