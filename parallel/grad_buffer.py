"""fp32 main gradients in contiguous bucketed buffers, reduced over data parallelism during backward.

Megatron-Core's DDP design, written for this trainer (its own needs CUDA):
- One flat buffer per parameter dtype holds every trainable parameter's main gradient (fp32 by
  default) and, beside it, a flat buffer of the parameters themselves (`param.data` becomes a view
  of it), both in the same layout. Frozen parameters get no slot.
- The layout follows the order the caller gives, which should be the order backward produces the
  gradients (the reverse of the forward's): buckets of about `bucket_numel` elements, each padded
  to a multiple of the data-parallel size so that it splits into equal shards, one per DP rank.
- A post-accumulate-grad hook adds each gradient into its main-gradient slot (upcast) and frees
  `param.grad`: gradients never accumulate in bf16 over micro-batches. A kernel may add a gradient
  into `param.main_grad` itself (gradient-accumulation fusion, as the fused cross-entropy does for the
  LM head) and then call `param.main_grad_added()`, which counts as the gradient's arrival.
- On the last micro-batch of a step (`start_last_backward`), a bucket's reduction launches
  asynchronously as soon as all of its parameters have their gradient AND every earlier bucket has
  launched, so the reductions overlap the rest of the backward and are issued in bucket order on
  every rank (the order collectives must match in). Parameters that a micro-batch does not reach
  (a text-only micro-batch skips the vision tower, which sits last in the order) leave their
  buckets for `finish`, which launches what is left, in order, and waits for everything.
- `shard=True` (the distributed optimizer): buckets are reduce-scattered, so each DP rank holds the
  summed gradient of its own shard of every bucket (`param_pieces`), and after the optimizer has
  written the new values of its shard into the parameter buffer, `gather_params` all-gathers the
  shards (optionally asynchronously, waited for by forward pre-hooks: overlapped with the next
  forward). `shard=False`: buckets are all-reduced and every rank holds everything.
- Tied parameters whose two copies live on different pipeline stages (`param.tied_group` set) sit
  in buckets of their own, reduced only in `finish`, after their gradients were summed over the
  tied group: the two stages' buckets then have the same layout, so shards correspond.
gloo has no reduce-scatter: there it is an all-reduce of the bucket (each rank then reads its shard).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from lingshu_fast.parallel.relay import model_chunks

DEFAULT_BUCKET_NUMEL = 40_000_000


@dataclass
class Bucket:
    params: list
    start: int  # element offsets in the buffer; [start, end) includes the padding
    end: int
    buffer: "FlatBuffer"
    deferred: bool = False  # reduced only in `finish` (tied across pipeline stages)
    pending: set = field(default_factory=set)  # ids of params whose gradient has not arrived yet
    work: Optional[object] = None
    gather_work: Optional[object] = None

    def shard(self, rank: int, size: int) -> tuple[int, int]:
        n = (self.end - self.start) // size
        return self.start + rank * n, self.start + (rank + 1) * n


class FlatBuffer:
    """The main gradients and the parameters of one parameter dtype, in one layout."""

    def __init__(self, params: list, layout: list, numel: int, grad_dtype: torch.dtype, device):
        dtype = params[0].dtype
        self.grads = torch.zeros(numel, dtype=grad_dtype, device=device)
        self.params = torch.zeros(numel, dtype=dtype, device=device)
        self.offsets: dict[int, int] = {}
        for p, offset in layout:
            n = p.numel()
            self.params[offset:offset + n].copy_(p.detach().reshape(-1))
            p.data = self.params[offset:offset + n].view_as(p)
            p.main_grad = self.grads[offset:offset + n].view_as(p)
            self.offsets[id(p)] = offset


class GradBuffers:
    def __init__(self, params: Sequence[torch.nn.Parameter], *, dp_group=None, shard: bool = False,
                 bucket_numel: int = DEFAULT_BUCKET_NUMEL, grad_dtype: torch.dtype = torch.float32,
                 overlap: bool = True):
        self.dp_group = dp_group
        self.dp = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.dp_rank = dist.get_rank(dp_group) if dp_group is not None else 0
        self.shard, self.overlap = shard and self.dp > 1, overlap
        self.params = [p for p in params if p.requires_grad]
        self.buckets: list[Bucket] = []
        self.buffers: list[FlatBuffer] = []
        for dtype in dict.fromkeys(p.dtype for p in self.params):
            self._build([p for p in self.params if p.dtype == dtype], bucket_numel, grad_dtype)
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._launching = False
        self._next = 0  # the first bucket not launched yet
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]
        for p in self.params:
            p.main_grad_added = functools.partial(self._arrived, p)

    def _build(self, params: list, bucket_numel: int, grad_dtype: torch.dtype) -> None:
        if not params:
            return
        # tied parameters last, each alone: their buckets wait for the tied-group sum in `finish`
        plain = [p for p in params if getattr(p, "tied_group", None) is None]
        groups, current, size = [], [], 0
        for p in plain:
            if current and size + p.numel() > bucket_numel:
                groups.append(current)
                current, size = [], 0
            current.append(p)
            size += p.numel()
        if current:
            groups.append(current)
        groups += [[p] for p in params if getattr(p, "tied_group", None) is not None]
        layout, offset, spans = [], 0, []
        for group in groups:
            start = offset
            for p in group:
                layout.append((p, offset))
                offset += p.numel()
            offset = start + -(-(offset - start) // self.dp) * self.dp  # pad to a multiple of dp
            spans.append((group, start, offset))
        buffer = FlatBuffer(params, layout, offset, grad_dtype, params[0].device)
        self.buffers.append(buffer)
        for group, start, end in spans:
            deferred = getattr(group[0], "tied_group", None) is not None
            self.buckets.append(Bucket(group, start, end, buffer, deferred=deferred))

    # ------------------------------------------------------------------ backward
    def zero(self) -> None:
        """Start of a step: zero the main gradients; reductions launch only after `start_last_backward`."""
        for buf in self.buffers:
            buf.grads.zero_()
        self._launching, self._next = False, 0
        for b in self.buckets:
            b.pending, b.work = {id(p) for p in b.params}, None

    def start_last_backward(self) -> None:
        """The last micro-batch's backward begins: buckets may reduce as soon as they are complete."""
        self._launching = self.overlap

    @torch.no_grad()
    def _on_grad(self, p: torch.nn.Parameter) -> None:
        if p.grad is None:  # autograd got None for it (a kernel added into main_grad and announces it itself)
            return
        p.main_grad.add_(p.grad)
        p.grad = None
        self._arrived(p)

    def _arrived(self, p: torch.nn.Parameter) -> None:
        if self._launching:
            bucket = self._bucket_of[id(p)]
            bucket.pending.discard(id(p))
            self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets):
            b = self.buckets[self._next]
            if b.pending or b.deferred:
                return
            self._launch(b)
            self._next += 1

    def _launch(self, b: Bucket) -> None:
        if self.dp == 1:
            return
        grads = b.buffer.grads[b.start:b.end]
        if self.shard and dist.get_backend(self.dp_group) == "nccl":
            lo, hi = b.shard(self.dp_rank, self.dp)
            b.work = dist.reduce_scatter_tensor(b.buffer.grads[lo:hi], grads, group=self.dp_group, async_op=True)
        else:  # gloo has no reduce-scatter: reduce everything, each rank then reads its shard
            b.work = dist.all_reduce(grads, group=self.dp_group, async_op=True)

    def finish(self) -> None:
        """After the step's backward: sum tied gradients over their group, launch what is left in
        bucket order, and wait for every reduction."""
        while self._next < len(self.buckets):
            b = self.buckets[self._next]
            if b.deferred:
                p = b.params[0]
                dist.all_reduce(b.buffer.grads[b.start:b.start + p.numel()], group=p.tied_group)
            self._launch(b)
            self._next += 1
        for b in self.buckets:
            if b.work is not None:
                b.work.wait()
                b.work = None
        self._launching = False

    # ------------------------------------------------------------------ this rank's share
    def _owned(self, b: Bucket) -> tuple[int, int]:
        """[lo, hi) of bucket `b` this rank owns: its shard, or all of it."""
        return b.shard(self.dp_rank, self.dp) if self.shard else (b.start, b.end)

    def param_pieces(self) -> list[tuple[torch.nn.Parameter, FlatBuffer, int, int]]:
        """(param, buffer, lo, hi): the part [lo, hi) of each parameter's buffer span this rank owns
        (absolute buffer offsets; parameters it owns nothing of are left out)."""
        out = []
        for b in self.buckets:
            lo, hi = self._owned(b)
            for p in b.params:
                start = b.buffer.offsets[id(p)]
                a, z = max(lo, start), min(hi, start + p.numel())
                if a < z:
                    out.append((p, b.buffer, a, z))
        return out

    @torch.no_grad()
    def scale_(self, factor: float) -> None:
        if factor != 1.0:
            for b in self.buckets:
                lo, hi = self._owned(b)
                b.buffer.grads[lo:hi].mul_(factor)

    # ------------------------------------------------------------------ parameters back to every rank
    def gather_params(self, async_op: bool = False) -> None:
        """All-gather the parameter shards the optimizer updated (distributed optimizer only)."""
        if not self.shard:
            return
        for b in self.buckets:
            lo, hi = b.shard(self.dp_rank, self.dp)
            whole, mine = b.buffer.params[b.start:b.end], b.buffer.params[lo:hi]
            if dist.get_backend(self.dp_group) == "nccl":
                b.gather_work = dist.all_gather_into_tensor(whole, mine, group=self.dp_group, async_op=async_op)
            else:
                parts = list(whole.chunk(self.dp))
                b.gather_work = dist.all_gather(parts, mine.clone(), group=self.dp_group, async_op=async_op)
            if not async_op:
                b.gather_work = None

    def wait_params(self, params: Optional[Sequence] = None) -> None:
        """Wait for the gathers of the buckets holding `params` (all buckets when None)."""
        buckets = self.buckets if params is None else {id(self._bucket_of[id(p)]): self._bucket_of[id(p)]
                                                       for p in params if id(p) in self._bucket_of}.values()
        for b in buckets:
            if b.gather_work is not None:
                b.gather_work.wait()
                b.gather_work = None

    def wait_before_forward(self, model: torch.nn.Module) -> list:
        """Forward pre-hooks that wait for a module's parameters' gather (overlap with the forward), and on
        each pipeline chunk (`model_chunks`) a forward hook that waits for all of the chunk's: a parameter
        read outside its module's forward (the LM head weight, which the fused loss takes directly after
        the forward) is then complete before anything reads it."""
        handles = []
        for module in model.modules():
            own = [p for p in module.parameters(recurse=False) if id(p) in self._bucket_of]
            if own:
                handles.append(module.register_forward_pre_hook(lambda m, args, own=own: self.wait_params(own)))
        for chunk in model_chunks(model):
            own = [p for p in chunk.parameters() if id(p) in self._bucket_of]
            if own:
                handles.append(chunk.register_forward_hook(lambda m, args, out, own=own: self.wait_params(own)))
        return handles

    # ------------------------------------------------------------------ accounting
    def nbytes(self) -> tuple[int, int]:
        """(parameter buffer bytes, main-gradient buffer bytes) on this rank."""
        return (sum(b.params.numel() * b.params.element_size() for b in self.buffers),
                sum(b.grads.numel() * b.grads.element_size() for b in self.buffers))
