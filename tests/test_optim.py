"""Optimizer, LR schedule, ZeRO-1 and TP-aware gradient clipping (lingshu_fast.train.optim)."""
from __future__ import annotations

import io
import math

import pytest
import torch

from lingshu_fast.config import OptimConfig
from lingshu_fast.parallel.spawn import spawn
from lingshu_fast.train.optim import (
    WarmupDecay, build_optimizer, build_scheduler, clip_grad_norm, current_lrs,
    load_optimizer_state_dict, optimizer_state_dict,
)


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
    opt.zero_grad()
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


def test_optimizer_and_scheduler_state_load_with_weights_only():
    """Pins: checkpoints load optimizer and scheduler state with torch.load(weights_only=True); a
    closure lambda or a numpy scalar in either state would make that load fail. After reloading into
    fresh objects the next step must be bit-identical."""
    def make():
        v, m, l = _tiny_groups()
        cfg = OptimConfig(lr=1e-2, weight_decay=0.1, warmup_steps=2)
        opt = build_optimizer(_groups_of(v, m, l), cfg)
        return (v, m, l), opt, build_scheduler(opt, cfg, max_steps=10)

    def one_step(mods, opt, sched, seed):
        torch.manual_seed(seed)
        v, m, l = mods
        (m(v(torch.randn(3, 4))).square().sum() + l(torch.tensor([1, 3])).square().sum()).backward()
        opt.step()
        opt.zero_grad()
        sched.step()

    mods, opt, sched = make()
    for s in range(3):
        one_step(mods, opt, sched, s)
    buf = io.BytesIO()
    torch.save({"optim": optimizer_state_dict(opt), "sched": sched.state_dict(),
                "model": [m.state_dict() for m in mods]}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    mods2, opt2, sched2 = make()
    for m, sd in zip(mods2, state["model"]):
        m.load_state_dict(sd)
    load_optimizer_state_dict(opt2, state["optim"])
    sched2.load_state_dict(state["sched"])
    one_step(mods, opt, sched, 7)
    one_step(mods2, opt2, sched2, 7)
    for a, b in zip(mods, mods2):
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa, pb)
    assert current_lrs(opt) == current_lrs(opt2)


def test_clip_grad_norm_single_process_and_nonfinite():
    """Pins: without TP the norm and the clipped grads equal torch.nn.utils.clip_grad_norm_ (1e-6:
    both sum squares in fp32, in a different order); a non-finite norm is reported and the
    gradients are left untouched so the loop can skip the step."""
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for pa, pb in zip(a, b):
        pa.grad = torch.randn_like(pa) * 3
        pb.grad = pa.grad.clone()
    ours = clip_grad_norm(a, 1.0)
    ref = float(torch.nn.utils.clip_grad_norm_(b, 1.0))
    assert ours == pytest.approx(ref, rel=1e-6)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-6, atol=0)
    assert clip_grad_norm(a, 0.0) == pytest.approx(1.0, rel=1e-5)  # measure only

    a[1].grad[2] = float("nan")
    before = [p.grad.clone() for p in a]
    assert math.isnan(clip_grad_norm(a, 1.0))
    assert torch.equal(before[0], a[0].grad)
    a[1].grad[2] = float("inf")
    assert clip_grad_norm(a, 1.0) == float("inf")


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


def _tp_norm_and_zero(dims, seed: int):
    import torch.distributed as dist
    from megatron.core import ModelParallelConfig, parallel_state as ps
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
    torch.manual_seed(seed + 1)
    x = torch.randn(4, 6)
    h, _ = col(x)
    y, _ = row(torch.relu(h))
    (y * gain).square().sum().backward()
    params = [col.weight, col.bias, row.weight, row.bias, gain]
    tp_norm = clip_grad_norm(params, 0.0, tp_group=ps.get_tensor_model_parallel_group())
    naive_sq = sum(float(p.grad.square().sum()) for p in params)
    dist.all_reduce(t := torch.tensor(naive_sq), group=ps.get_tensor_model_parallel_group())
    ref_norm = _full_grad_norm(x, seed)

    # ZeRO-1 over the 2 ranks (the whole world serves as the DP group here) against plain AdamW.
    def run(zero1: bool, steps=range(4), resume_from=None, dtype=torch.float32):
        v, m, l = (mod.to(dtype) for mod in _tiny_groups(seed))
        ocfg = OptimConfig(lr=1e-2, lr_vision=1e-3, lr_merger=5e-3, weight_decay=0.1, warmup_steps=2,
                           zero1=zero1)
        opt = build_optimizer(_groups_of(v, m, l), ocfg)
        sched = build_scheduler(opt, ocfg, max_steps=6)
        if resume_from is not None:  # per-rank ZeRO shard through a weights_only round trip
            buf = io.BytesIO()
            torch.save(resume_from, buf)
            buf.seek(0)
            ckpt = torch.load(buf, weights_only=True)
            for mod, sd in zip((v, m, l), ckpt["model"]):
                mod.load_state_dict(sd)
            load_optimizer_state_dict(opt, ckpt["optim"])
            sched.load_state_dict(ckpt["sched"])
        for step in steps:
            torch.manual_seed(100 + step)  # same batch on both ranks: grads stand in for all-reduced ones
            x = torch.randn(3, 4, dtype=dtype)
            (m(v(x)).float().square().sum() + l(torch.tensor([1, 3])).float().square().sum()).backward()
            opt.step()
            opt.zero_grad()
            sched.step()
        state = torch.cat([p.detach().flatten() for mod in (v, m, l) for p in mod.parameters()])
        ckpt = {"model": [mod.state_dict() for mod in (v, m, l)], "optim": optimizer_state_dict(opt),
                "sched": sched.state_dict()}
        return opt, state, ckpt

    zopt, zstate, _ = run(True)
    _, plain_state, _ = run(False)
    _, _, half_ckpt = run(True, steps=range(2))
    _, resumed_state, _ = run(True, steps=range(2, 4), resume_from=half_ckpt)
    zopt16, z16, _ = run(True, dtype=torch.bfloat16)
    _, plain16, _ = run(False, dtype=torch.bfloat16)
    mixed = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))]
    try:
        build_optimizer({"llm": mixed}, OptimConfig(zero1=True))
        mixed_error = None
    except ValueError as err:
        mixed_error = str(err)
    local = optimizer_state_dict(zopt)
    n_local = len(local["zero1_local"]["state"])
    return dict(tp_norm=tp_norm, naive=math.sqrt(float(t)), ref=ref_norm,
                zero_kind=type(zopt).__name__, zero_max_diff=float((zstate - plain_state).abs().max()),
                resume_equal=torch.equal(resumed_state, zstate), mixed_error=mixed_error,
                bf16_zero_equal=torch.equal(z16, plain16), bf16_local=type(zopt16.optim).__name__,
                n_local=n_local, lrs=current_lrs(zopt))


@pytest.mark.dist
def test_tp_grad_norm_and_zero1_on_gloo():
    """Pins (1) Megatron's counting rule: with TP=2 the clip norm equals the unsharded model's norm
    (1e-5 relative: fp32 sums in another order); the naive all-rank sum double-counts the replicated
    row bias and gain, so it must differ. (2) ZeRO-1 with per-group LRs and the schedule gives the
    same weights as plain AdamW (1e-6 absolute: the same fp32 arithmetic on each shard) while each
    rank holds state for only part of the parameters; with bf16 weights its local optimizer is
    MasterAdamW (fp32 masters for the shard only) and the result is bit-identical to unsharded
    MasterAdamW; a shard saved per rank reloads into a bit-identical continuation."""
    res = spawn(_tp_norm_and_zero, 2, 3, tp=2)
    for r in res:
        assert r["tp_norm"] == pytest.approx(r["ref"], rel=1e-5)
        assert abs(r["naive"] - r["ref"]) > 1e-3 * r["ref"]
        assert r["zero_kind"] == "ZeroRedundancyOptimizer"
        assert r["zero_max_diff"] < 1e-6
        assert r["bf16_zero_equal"] and r["bf16_local"] == "MasterAdamW"  # masters only for the shard
        assert "one dtype" in r["mixed_error"]  # a clear error, not ZeRO's "same dense type"
        assert r["resume_equal"]  # ZeRO shard saved per rank and reloaded: bit-identical continuation
        assert r["lrs"]["vision"] != r["lrs"]["llm"]
    n_params = sum(len(list(m.parameters())) for m in _tiny_groups())
    assert sum(r["n_local"] for r in res) == n_params and all(r["n_local"] < n_params for r in res)


def test_bf16_params_get_fp32_master_weights():
    """Pins the bf16 stall: with bf16 weights ~1 and lr 1e-5 a plain AdamW update (~1e-5) is below
    bf16's resolution (2^-8 relative), so the weights never move. MasterAdamW must track an fp32
    AdamW run: its bf16 weights equal the fp32 reference rounded to bf16 (exact: same fp32
    arithmetic, then one rounding), zero_grad must clear the model's gradients, and the masters
    must survive a weights_only state round trip."""
    torch.manual_seed(0)
    start16 = (torch.rand(8, 8) + 0.5).to(torch.bfloat16)
    w32 = torch.nn.Parameter(start16.float())  # the same starting values as the bf16 runs
    w16 = torch.nn.Parameter(start16.clone())
    plain16 = torch.nn.Parameter(start16.clone())
    cfg = OptimConfig(lr=1e-5, warmup_steps=0, schedule="constant")
    ref = build_optimizer({"llm": [w32]}, cfg)
    ours = build_optimizer({"llm": [w16]}, cfg)
    assert type(ours).__name__ == "MasterAdamW" and type(ref) is torch.optim.AdamW
    plain = torch.optim.AdamW([plain16], lr=1e-5, weight_decay=0.0)
    for step in range(300):  # a steady gradient: Adam moves each weight ~lr per step, 3e-3 in all
        g = (1.0 + 0.1 * torch.randn(8, 8)).to(torch.bfloat16).float()  # exact in bf16 and fp32
        for p, o in ((w32, ref), (w16, ours), (plain16, plain)):
            o.zero_grad()
            p.grad = g.to(p.dtype)
            o.step()
    assert torch.equal(plain16.detach(), start16)  # the stall MasterAdamW exists for
    assert not torch.equal(w16.detach(), start16)
    torch.testing.assert_close(w16.detach(), w32.detach().to(torch.bfloat16), rtol=0, atol=0)
    ours.zero_grad()
    assert w16.grad is None

    buf = io.BytesIO()
    torch.save(optimizer_state_dict(ours), buf)
    buf.seek(0)
    w16b = torch.nn.Parameter(torch.zeros(8, 8, dtype=torch.bfloat16))
    again = build_optimizer({"llm": [w16b]}, cfg)
    load_optimizer_state_dict(again, torch.load(buf, weights_only=True))
    assert torch.equal(w16b.detach(), w16.detach())
    g = torch.randn(8, 8)
    for p, o in ((w16, ours), (w16b, again)):
        p.grad = g.to(torch.bfloat16)
        o.step()
    assert torch.equal(w16b.detach(), w16.detach())
