"""The pipeline's `before_last_backward` on the last stage fires when the LOSS's backward starts, so the
grad buffers see the LM head's gradient (the first one backward produces) with reductions enabled and
reduce its bucket during the backward. A hook at the stage output's gradient comes after the head's
backward: the head's bucket, first in backward order, then waited for `finish` and held every later
bucket behind it.

Stand-in chunks (a linear layer each, the last one with a head read by the fused loss) expose what
`PipelineSchedules` reads; two processes, pp=2, 1F1B and GPipe."""
from types import SimpleNamespace

import pytest
import torch

from lingshu_fast.parallel.spawn import spawn

H, TOKENS, VOCAB = 8, 6, 24


class _Chunk(torch.nn.Module):
    def __init__(self, first: bool, last: bool):
        super().__init__()
        torch.manual_seed(1 + int(last))
        self.lin = torch.nn.Linear(H, H)
        self.head = torch.nn.Linear(H, VOCAB, bias=False) if last else None
        self.pre_process, self.post_process = first, last
        self.config = SimpleNamespace(text_config=SimpleNamespace(hidden_size=H))
        self.dtype, self.tp, self.sequence_parallel = torch.float32, 1, False

    def forward(self, hidden_states, **_):
        return SimpleNamespace(hidden_states=self.lin(hidden_states))


def _head_bucket_launches(dims):
    """(on the last stage) per schedule, the launches as (is the head's bucket, `finish` had started)."""
    return {schedule: _head_bucket_launch(dims, schedule) for schedule in ("1f1b", "gpipe")}


def _head_bucket_launch(dims, schedule: str):
    from megatron.core import parallel_state as ps

    from lingshu_fast.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
    from lingshu_fast.parallel.grad_buffer import GradBuffers
    from lingshu_fast.parallel.pipeline import PipelineSchedules

    last = dims.pp_rank == 1
    chunk = _Chunk(first=not last, last=last)
    params = list(reversed(list(chunk.parameters())))  # backward order: the head first
    buffers = GradBuffers(params, bucket_numel=H * H + H)  # the head (192 elements) in a bucket of its own
    finishing, launches = [False], []
    real_launch = buffers._launch
    buffers._launch = lambda b: (launches.append((b.params[0] is params[0], finishing[0])), real_launch(b))[1]
    schedules = PipelineSchedules([chunk], pp=2, pp_rank=dims.pp_rank, pp_group=ps.get_pipeline_model_parallel_group(),
                                  schedule=schedule, tokens=TOKENS)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(TOKENS, H, generator=gen) for _ in range(2)]
    labels = [torch.randint(0, VOCAB, (TOKENS,), generator=gen) for _ in range(2)]
    mbs = [SimpleNamespace(position_ids=None, cu_seqlens=None, max_seqlen=TOKENS) for _ in range(2)]

    def loss_fn(hidden, k):
        w = chunk.head.weight
        return fused_linear_cross_entropy(hidden, w, labels[k], reduction="sum", main_grad=w.main_grad,
                                          on_main_grad=w.main_grad_added)

    buffers.zero()
    schedules.step(mbs, lambda c, k: c.lin(xs[k]), loss_fn, before_last_backward=buffers.start_last_backward)
    finishing[0] = True
    buffers.finish()
    return launches if last else None


@pytest.mark.dist
def test_last_stage_reduces_the_head_bucket_during_backward(monkeypatch):
    monkeypatch.setenv("LINGSHU_KERNELS", "torch")
    _, by_schedule = spawn(_head_bucket_launches, 2, pp=2)
    for schedule, launches in by_schedule.items():
        assert launches[0] == (True, False), (schedule, launches)  # the head's bucket, inside the backward
        assert len(launches) == 2, (schedule, launches)
