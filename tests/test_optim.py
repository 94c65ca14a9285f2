"""Optimizer over fp32 main parameters and gradients, the distributed optimizer, LR schedule and the
layout-independent gradient norm (lingshu_fast.train.optim, lingshu_fast.parallel.grad_buffer)."""
from __future__ import annotations

import io
import math

import pytest
import torch

from lingshu_fast.config import OptimConfig
from lingshu_fast.parallel.spawn import spawn
from lingshu_fast.train.optim import WarmupDecay, build_optimizer, build_scheduler, current_lrs, grad_norm_squared


def _backward(opt, loss_fn):
    """One step's gradients the way the engine makes them: zeroed buffers, backward (the hooks move
    each gradient into its fp32 main-gradient slot), then the reductions."""
    opt.buffers.zero()
    opt.buffers.start_last_backward()
    loss_fn().backward()
    opt.buffers.finish()


def _tiny_groups(seed: int = 0):
    torch.manual_seed(seed)
    vision = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6))
    merger = torch.nn.Linear(6, 5)
    llm = torch.nn.Sequential(torch.nn.Embedding(7, 5), torch.nn.Linear(5, 5))
    return vision, merger, llm


def _groups_of(vision, merger, llm):
    return {"vision": list(vision.parameters()), "merger": list(merger.parameters()),
            "llm": list(llm.parameters())}


def test_param_groups_lrs_decay_and_freezing():
    """Pins: per-module LRs (stage 1 uses 2e-6 vision / 1e-5 merger), no weight decay on 1-D params
    (biases, norm gains), and frozen params kept out of the optimizer (AdamW's decoupled decay would
    move them even with zero gradient)."""
    vision, merger, llm = _tiny_groups()
    for p in llm.parameters():
        p.requires_grad_(False)
    cfg = OptimConfig(lr=1e-5, lr_vision=2e-6, lr_merger=3e-5, weight_decay=0.1)
    opt = build_optimizer(_groups_of(vision, merger, llm), cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["foreach"] is True and not opt.defaults.get("fused")
    by_key = {(g["name"], g["decay"]): g for g in opt.param_groups}
    assert set(by_key) == {("vision", True), ("vision", False), ("merger", True), ("merger", False)}
    assert by_key["vision", True]["lr"] == 2e-6 and by_key["merger", False]["lr"] == 3e-5
    assert by_key["vision", True]["weight_decay"] == 0.1 and by_key["vision", False]["weight_decay"] == 0.0
    assert all(p.ndim == 1 for g in opt.param_groups if not g["decay"] for p in g["params"])
    n_opt = sum(len(g["params"]) for g in opt.param_groups)
    assert n_opt == len(list(vision.parameters())) + len(list(merger.parameters()))
    assert current_lrs(opt) == {"vision": 2e-6, "merger": 3e-5}

    frozen_before = [p.detach().clone() for p in llm.parameters()]
    loss = merger(vision(torch.randn(3, 4))).sum() + llm(torch.tensor([1, 2])).sum()
    loss.backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(frozen_before, llm.parameters()))


def test_param_group_errors_and_all_frozen_stage():
    """Pins: a parameter listed in two module groups is a clear error rather than a doubled update;
    a model part with nothing trainable (a pipeline stage of frozen LLM layers in stage 1) gets a
    working empty optimizer and schedule instead of torch's 'empty parameter list' error."""
    vision, merger, llm = _tiny_groups()
    shared = list(vision.parameters())
    with pytest.raises(ValueError, match="both module groups"):
        build_optimizer({"vision": shared, "llm": shared}, OptimConfig())
    with pytest.raises(ValueError, match="unknown module group"):
        build_optimizer({"text": shared}, OptimConfig())
    for p in [*vision.parameters(), *merger.parameters(), *llm.parameters()]:
        p.requires_grad_(False)
    opt = build_optimizer(_groups_of(vision, merger, llm), OptimConfig(lr=1e-5, warmup_steps=1))
    sched = build_scheduler(opt, OptimConfig(lr=1e-5, warmup_steps=1), max_steps=4)
    opt.buffers.zero()
    opt.buffers.finish()
    opt.step()
    sched.step()
    assert current_lrs(opt) == {"frozen": pytest.approx(1e-5)}
    assert sum(len(g["params"]) for g in opt.param_groups) == 0


def test_schedule_shapes_and_per_group_base_lr():
    """Pins: warm-up reaches the base LR at `warmup_steps`, cosine ends at min_lr_ratio at max_steps,
    and each group scales its own base LR (not the merger LR applied to vision). Exact floats: the
    schedule is closed-form arithmetic."""
    vision, merger, llm = _tiny_groups()
    cfg = OptimConfig(lr=1e-3, lr_vision=1e-4, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    opt = build_optimizer(_groups_of(vision, merger, llm), cfg)
    sched = build_scheduler(opt, cfg, max_steps=14)
    seen = []
    for _ in range(16):
        seen.append(current_lrs(opt))
        opt.step()
        sched.step()
    assert seen[0]["llm"] == pytest.approx(1e-3 / 5) and seen[0]["vision"] == pytest.approx(1e-4 / 5)
    assert seen[3]["llm"] == pytest.approx(1e-3 * 4 / 5)
    assert seen[4]["llm"] == pytest.approx(1e-3) and seen[4]["vision"] == pytest.approx(1e-4)
    assert seen[9]["llm"] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half-way through the cosine
    assert seen[14]["llm"] == pytest.approx(1e-4) and seen[15]["vision"] == pytest.approx(1e-5)
    lin = WarmupDecay(2, 12, "linear", 0.0)
    assert lin(2) == 1.0 and lin(7) == pytest.approx(0.5) and lin(12) == 0.0
    const = WarmupDecay(0, 12, "constant", 0.0)
    assert const(0) == 1.0 and const(100) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        WarmupDecay(0, 1, "step", 0.0)


def test_scheduler_state_loads_with_weights_only():
    """Pins: checkpoints load the scheduler state with torch.load(weights_only=True) (a closure
    lambda or a numpy scalar in it would make that load fail), and the reloaded schedule continues
    exactly. The optimizer's own state is written by name (state_io) and tested with the trainer."""
    cfg = OptimConfig(lr=1e-2, warmup_steps=2)
    v, m, l = _tiny_groups()
    opt = build_optimizer(_groups_of(v, m, l), cfg)
    sched = build_scheduler(opt, cfg, max_steps=10)
    for _ in range(3):
        sched.step()
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    opt2 = build_optimizer(_groups_of(*_tiny_groups()), cfg)
    sched2 = build_scheduler(opt2, cfg, max_steps=10)
    sched2.load_state_dict(torch.load(buf, weights_only=True))
    sched.step(), sched2.step()
    assert current_lrs(opt) == current_lrs(opt2)


def test_main_gradients_norm_and_clip_match_torch():
    """Pins: gradients of bf16 parameters accumulate over micro-batches in fp32 main gradients
    (`param.grad` is freed after each), frozen parameters get no slot, the norm of the main
    gradients equals torch's clip_grad_norm_ on an fp32 twin given the same bf16 gradients (1e-6:
    fp32 sums in another order), scaling by min(1, clip / norm) gives torch's clipped gradients, and
    the bytes are 2 (bf16 parameter) + 4 (fp32 main gradient) + 12 (master, m, v) per parameter."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5).to(torch.bfloat16)
    frozen = torch.nn.Linear(5, 5).to(torch.bfloat16).requires_grad_(False)
    opt = build_optimizer({"llm": [*lin.parameters(), *frozen.parameters()]}, OptimConfig(), model=None)
    xs = [torch.randn(4, 6).to(torch.bfloat16) for _ in range(3)]
    opt.buffers.zero()
    for k, x in enumerate(xs):  # three micro-batches, the reduction only after the last
        if k == len(xs) - 1:
            opt.buffers.start_last_backward()
        frozen(lin(x)).float().square().sum().backward()
        assert all(p.grad is None for p in lin.parameters())
    opt.buffers.finish()
    twin = [torch.nn.Parameter(p.detach().float()) for p in lin.parameters()]
    grads = []
    for x in xs:  # the same per-micro-batch bf16 gradients (autograd.grad: no hooks), summed in fp32
        grads.append([g.float() for g in torch.autograd.grad(frozen(lin(x)).float().square().sum(),
                                                             list(lin.parameters()))])
    for k, p in enumerate(twin):
        p.grad = sum(g[k] for g in grads)
    norm = math.sqrt(float(grad_norm_squared(opt)))
    ref = float(torch.nn.utils.clip_grad_norm_(twin, 1.0))
    assert norm == pytest.approx(ref, rel=1e-6)
    opt.buffers.scale_(min(1.0, 1.0 / (norm + 1e-6)))
    for p, t in zip(lin.parameters(), twin):
        torch.testing.assert_close(p.main_grad, t.grad, rtol=1e-5, atol=1e-7)
    n = sum(p.numel() for p in lin.parameters())
    params_bytes, grad_bytes = opt.buffers.nbytes()
    opt.step()
    assert (params_bytes, grad_bytes, opt.nbytes()) == (2 * n, 4 * n, 12 * n)
    assert not any(hasattr(p, "main_grad") for p in frozen.parameters())


# --------------------------------------------------------------------------- multi-process


def _full_model(seed: int):
    torch.manual_seed(seed)
    return {"w1": torch.randn(8, 6), "b1": torch.randn(8), "w2": torch.randn(6, 8), "b2": torch.randn(6),
            "g": torch.randn(6)}


def _full_grad_norm(x: torch.Tensor, seed: int) -> float:
    w = {k: torch.nn.Parameter(v) for k, v in _full_model(seed).items()}
    h = torch.relu(x @ w["w1"].T + w["b1"])
    y = (h @ w["w2"].T + w["b2"]) * w["g"]
    y.square().sum().backward()
    return math.sqrt(sum(float(p.grad.square().sum()) for p in w.values()))


def _tp_norm(dims, seed: int):
    import torch.distributed as dist
    from megatron.core import ModelParallelConfig
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    cfg = ModelParallelConfig(tensor_model_parallel_size=dims.tp, use_cpu_initialization=True)
    init = torch.nn.init.zeros_
    col = ColumnParallelLinear(6, 8, config=cfg, init_method=init, bias=True, gather_output=False)
    row = RowParallelLinear(8, 6, config=cfg, init_method=init, bias=True, input_is_parallel=True,
                            skip_bias_add=False)
    gain = torch.nn.Parameter(torch.zeros(6))
    full, r, half = _full_model(seed), dims.tp_rank, 8 // dims.tp
    with torch.no_grad():
        col.weight.copy_(full["w1"][r * half:(r + 1) * half])
        col.bias.copy_(full["b1"][r * half:(r + 1) * half])
        row.weight.copy_(full["w2"][:, r * half:(r + 1) * half])
        row.bias.copy_(full["b2"])
        gain.copy_(full["g"])
    params = [col.weight, col.bias, row.weight, row.bias, gain]
    opt = build_optimizer({"llm": params}, OptimConfig())
    torch.manual_seed(seed + 1)
    x = torch.randn(4, 6)

    def loss():
        h, _ = col(x)
        y, _ = row(torch.relu(h))
        return (y * gain).square().sum()

    _backward(opt, loss)
    tp_sq = grad_norm_squared(opt, tp_rank=dims.tp_rank)
    naive_sq = sum(float(p.main_grad.square().sum()) for p in params)
    dist.all_reduce(tp_sq, group=ps.get_tensor_model_parallel_group())
    dist.all_reduce(t := torch.tensor(naive_sq), group=ps.get_tensor_model_parallel_group())
    return dict(tp_norm=math.sqrt(float(tp_sq)), naive=math.sqrt(float(t)), ref=_full_grad_norm(x, seed))


@pytest.mark.dist
def test_tp_grad_norm_counts_each_element_once():
    """Pins Megatron's counting rule: with TP=2 the gradient norm equals the unsharded model's
    (1e-5 relative: fp32 sums in another order); the naive all-rank sum double-counts the
    replicated row bias and gain, so it must differ."""
    for r in spawn(_tp_norm, 2, 3, tp=2):
        assert r["tp_norm"] == pytest.approx(r["ref"], rel=1e-5)
        assert abs(r["naive"] - r["ref"]) > 1e-3 * r["ref"]


def _dp_steps(dims, seed: int, distributed: bool, dtype_name: str, steps: int = 4):
    """Spawned (DP=2) or in-process (DP=1): AdamW steps of the tiny groups on this rank's half of each
    batch (the whole batch at DP=1), the loss a sum so that the DP-summed gradient is the full one."""
    from megatron.core import parallel_state as ps

    dtype = getattr(torch, dtype_name)
    v, m, l = (mod.to(dtype) for mod in _tiny_groups(seed))
    ocfg = OptimConfig(lr=1e-2, lr_vision=1e-3, lr_merger=5e-3, weight_decay=0.1, warmup_steps=2,
                       distributed=distributed)
    group = ps.get_data_parallel_group() if dims.dp > 1 else None
    opt = build_optimizer(_groups_of(v, m, l), ocfg, dp_group=group)
    sched = build_scheduler(opt, ocfg, max_steps=6)
    for step in range(steps):
        torch.manual_seed(100 + step)
        x, ids = torch.randn(4, 4).to(dtype), torch.tensor([1, 3, 2, 5])
        lo, hi = dims.dp_rank * 4 // dims.dp, (dims.dp_rank + 1) * 4 // dims.dp
        _backward(opt, lambda: m(v(x[lo:hi])).float().square().sum() + l(ids[lo:hi]).float().square().sum())
        opt.step()
        sched.step()
    weights = torch.cat([p.detach().float().flatten() for mod in (v, m, l) for p in mod.parameters()])
    owned = sum(hi - lo for _, _, lo, hi, _ in opt.pieces)
    return dict(weights=weights, owned=owned, total=sum(p.numel() for mod in (v, m, l) for p in mod.parameters()),
                optim_bytes=opt.nbytes(), lrs=current_lrs(opt))


@pytest.mark.dist
def test_distributed_optimizer_equals_one_process(world_of_one):
    """Pins the distributed optimizer over DP=2: reduce-scattered gradients, each rank stepping
    only its shard of the fp32 masters and moments, then all-gathered parameters give the weights of
    one process running the whole batch (1e-6: the same fp32 Adam arithmetic; the DP sum of
    gradients is the only reordering), with per-group LRs and the schedule; each rank owns about
    half of the elements and holds optimizer state for them only; the all-reduce variant
    (optim.distributed=false) gives the same weights. bf16: the masters make it bit-identical."""
    from lingshu_fast.parallel.state import current_dims

    for dtype in ("float32", "bfloat16"):
        want = _dp_steps(current_dims(), 3, False, dtype)
        sharded = spawn(_dp_steps, 2, 3, True, dtype)
        replicated = spawn(_dp_steps, 2, 3, False, dtype)
        for got in sharded + replicated:
            if dtype == "bfloat16":
                assert torch.equal(got["weights"], want["weights"])
            else:
                assert float((got["weights"] - want["weights"]).abs().max()) < 1e-6
            assert got["lrs"]["vision"] != got["lrs"]["llm"]
        assert sum(r["owned"] for r in sharded) >= want["total"] and all(r["owned"] < want["total"] for r in sharded)
        assert all(r["optim_bytes"] < want["optim_bytes"] for r in sharded)
        assert all(r["owned"] >= want["total"] for r in replicated)


def test_bf16_params_get_fp32_master_weights():
    """Pins the bf16 stall: with bf16 weights ~1 and lr 1e-5 a plain AdamW update (~1e-5) is below
    bf16's resolution (2^-8 relative), so the weights never move. The optimizer must track an fp32
    AdamW run through its fp32 masters: its bf16 weights equal the fp32 reference rounded to bf16
    (exact: same fp32 arithmetic, then one rounding)."""
    torch.manual_seed(0)
    start16 = (torch.rand(8, 8) + 0.5).to(torch.bfloat16)
    w32 = torch.nn.Parameter(start16.float())  # the same starting values as the bf16 runs
    w16 = torch.nn.Parameter(start16.clone())
    plain16 = torch.nn.Parameter(start16.clone())
    cfg = OptimConfig(lr=1e-5, warmup_steps=0, schedule="constant")
    ref = build_optimizer({"llm": [w32]}, cfg)
    ours = build_optimizer({"llm": [w16]}, cfg)
    plain = torch.optim.AdamW([plain16], lr=1e-5, weight_decay=0.0)
    for step in range(300):  # a steady gradient: Adam moves each weight ~lr per step, 3e-3 in all
        g = (1.0 + 0.1 * torch.randn(8, 8)).to(torch.bfloat16)  # exact in bf16 and fp32
        for p, o in ((w32, ref), (w16, ours)):
            _backward(o, lambda: (p * g.to(p.dtype)).float().sum())
            o.step()
        plain.zero_grad()
        plain16.grad = g
        plain.step()
    assert torch.equal(plain16.detach(), start16)  # the stall the masters exist for
    assert not torch.equal(w16.detach(), start16)
    torch.testing.assert_close(w16.detach(), w32.detach().to(torch.bfloat16), rtol=0, atol=0)


class _HeadReadOutsideForward(torch.nn.Module):
    """A trunk and a head whose forward never runs: the loss reads `head.weight` directly after the
    model's forward, as the fused cross-entropy reads the LM head weight."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk, self.head = torch.nn.Linear(4, 6), torch.nn.Linear(6, 9, bias=False)

    def forward(self, x):
        return self.trunk(x)


def _overlapped_and_plain(dims):
    return _overlapped_gather_steps(dims, True), _overlapped_gather_steps(dims, False)


def _overlapped_gather_steps(dims, overlap: bool):
    """DP=2, distributed optimizer: 3 steps; with `overlap`, each step's parameter all-gather runs
    asynchronously into the next forward. Reports, per step, whether every gather had been waited for
    when the model's forward returned (what the loss then reads must be complete)."""
    from megatron.core import parallel_state as ps

    model = _HeadReadOutsideForward()
    cfg = OptimConfig(lr=1e-2, warmup_steps=0, distributed=True, overlap_param_gather=overlap)
    opt = build_optimizer({"llm": list(model.parameters())}, cfg, dp_group=ps.get_data_parallel_group(), model=model,
                          bucket_numel=30)  # the head (54 elements) in a bucket of its own
    complete_after_forward = []
    for step in range(3):
        torch.manual_seed(100 + step + dims.dp_rank)
        x = torch.randn(3, 4)
        opt.buffers.zero()
        opt.buffers.start_last_backward()
        hidden = model(x)
        complete_after_forward.append(all(b.gather_work is None for b in opt.buffers.buckets))
        (hidden @ model.head.weight.T).square().sum().backward()
        opt.buffers.finish()
        opt.step()
    opt.buffers.wait_params()
    return complete_after_forward, torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.dist
def test_overlapped_param_gather_completes_before_the_loss_reads_the_head():
    """optim.overlap_param_gather: forward pre-hooks wait for each module's gather, and the model's
    forward hook for the rest, so the head weight the loss reads outside any module forward is never
    read mid-gather; the weights equal the non-overlapped run's. (Without the forward hook the head's
    bucket is still in flight when the forward returns: the first assertion fails.)"""
    for (complete, weights), (_, want) in spawn(_overlapped_and_plain, 2):
        assert complete == [True, True, True]
        assert torch.equal(weights, want)
