"""The planner's memory terms against measurement, at the real Qwen2.5-VL-7B widths.

Activations: the model at 7B widths (hidden 3584, MLP 18944, 28/4 heads; ViT 1280/3420/16 heads), two
decoder layers and two ViT blocks, runs forward + backward on a packed micro-batch of 2,048 tokens
holding four 448x448 images (4,096 patches) under each checkpointing policy. On CPU the live tensor
bytes are measured by tensor lifetimes (`LiveBytes`, with the matmuls and attention kernels replaced
by uninitialised outputs of the right shape: every allocation stays, the FLOPs go, so a run takes
seconds on two cores). Bytes each layer keeps are read at its forward's end (module hooks); the peak
over forward + backward is the tracker's. The planner's per-layer and peak predictions must agree
within 15% (the issue's bar; observed: per-layer exact, peaks within 2%, the gap being small
transients the model rounds). On CUDA the same comparison uses torch.cuda's allocator statistics
(bf16, the fused kernels' inventory).

Parameters, gradients and optimizer state: exactly `memory_report()`'s numbers.
"""
from __future__ import annotations

import pytest
import torch

from lingshu_fast.plan import activations as A

POLICIES = ("none", "selective", "full")
IMAGES, SIDE = 4, 32  # 4 images of 32 x 32 patches (448 x 448 pixels): 256 tokens each


def _config_7b_widths(layers: int = 2, blocks: int = 2, vocab: int = 2048):
    from lingshu_fast.model.config import tiny_hf_config

    special = dict(image_token_id=vocab - 48, video_token_id=vocab - 47, vision_start_token_id=vocab - 46,
                   vision_end_token_id=vocab - 45)
    return tiny_hf_config(
        vocab_size=vocab, **special,
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=layers, num_attention_heads=28,
                         num_key_value_heads=4,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24])),
        vision_config=dict(depth=blocks, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           fullatt_block_indexes=[0]))


def _batch(config, device):
    """Four samples, each an image (256 tokens) then 256 text tokens: 2,048 tokens, 4,096 patches."""
    img_tokens = SIDE * SIDE // 4
    ids = torch.tensor(([config.image_token_id] * img_tokens + [5] * img_tokens) * IMAGES, device=device)
    tokens = ids.numel()
    return dict(input_ids=ids, position_ids=torch.arange(tokens, device=device).expand(3, tokens).contiguous(),
                cu_seqlens=torch.arange(0, tokens + 1, 2 * img_tokens, dtype=torch.int32, device=device),
                pixel_values=torch.randn(IMAGES * SIDE * SIDE, 1176, device=device, dtype=torch.get_default_dtype()),
                image_grid_thw=torch.tensor([[1, SIDE, SIDE]] * IMAGES), labels=torch.full((tokens,), 7, device=device))


def _run(model, batch, live):
    """Forward + backward like the trainer (fused CE on the final hidden states; parameter gradients
    dropped after accumulation, as the grad buffers' hooks do). Returns {module: bytes kept}."""
    from lingshu_fast.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

    kept, forward = {}, [True]
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))

    def before(name):
        def hook(module, args):
            if forward[0]:
                kept[name] = -live()
        return hook

    def after(name):
        def hook(module, args, output):
            if forward[0]:  # not again when full recompute reruns the layer in backward
                kept[name] += live()
        return hook

    for name, mod in [(f"layer{i}", m) for i, m in enumerate(model.layers)] + \
                     [(f"block{j}", m) for j, m in enumerate(model.visual.blocks)]:
        mod.register_forward_pre_hook(before(name))
        mod.register_forward_hook(after(name))
    labels = batch.pop("labels")
    out = model(**batch)
    loss = fused_linear_cross_entropy(out.hidden_states, model.lm_head_weight, labels, reduction="sum")
    forward[0] = False
    del out
    loss.backward()
    return kept


def _predicted(config, policy, backend, tokens, patches, tp_workspace):
    w = A.Widths.of(config)
    layers = config.text_config.num_hidden_layers
    act, ws = A.rank_activation_peak(w, tokens, patches, A.RankPieces(tuple(range(layers)), True, True),
                                     policy=policy, every_k=1, backend=backend, split=A.Split(),
                                     vit_depth=config.vision_config.depth, head_workspace=tp_workspace)
    return w, act + ws


@pytest.fixture(scope="module")
def cpu_measurements(world_of_one_module):
    from lingshu_fast.model.qwen2_5_vl import Qwen25VLModel
    from lingshu_fast.plan.tracker import LiveBytes

    config = _config_7b_widths()
    results = {}
    for policy in POLICIES:
        model = Qwen25VLModel(config, dtype=torch.float32, activation_checkpointing=policy)  # weights: torch.empty
        with LiveBytes(skip_compute=True) as tracker:
            batch = _batch(config, "cpu")
            kept = _run(model, batch, lambda: tracker.live)
        results[policy] = dict(kept=kept, peak=tracker.peak)
        del model
    return config, results


@pytest.fixture(scope="module")
def world_of_one_module():
    import os

    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        os.environ.pop("WORLD_SIZE", None)
        from lingshu_fast.parallel.state import init_parallel

        init_parallel(1, 1, backend="gloo")


@pytest.mark.parametrize("policy", POLICIES)
def test_per_layer_prediction_matches_measurement(cpu_measurements, policy):
    """Pins the planner's per-layer activation bytes (decoder layer per token, ViT block per patch)
    for each policy against the bytes each layer really keeps, at the 7B widths, within 15%."""
    config, results = cpu_measurements
    kept = results[policy]["kept"]
    w = A.Widths.of(config)
    tokens, patches = IMAGES * SIDE * SIDE // 2, IMAGES * SIDE * SIDE
    layer_pred = tokens * A.decoder_layer_bytes_per_token(w, policy, "reference")
    block_pred = patches * A.vit_block_bytes_per_patch(w, policy, "reference")
    for name in ("layer0", "layer1"):
        assert abs(kept[name] / layer_pred - 1) < 0.15, (name, kept[name] / 2**20, layer_pred / 2**20)
    for name in ("block0", "block1"):
        assert abs(kept[name] / block_pred - 1) < 0.15, (name, kept[name] / 2**20, block_pred / 2**20)


@pytest.mark.parametrize("policy", POLICIES)
def test_peak_prediction_matches_measurement(cpu_measurements, policy):
    """Pins the planner's peak (saved tensors + the backward's transients + the loss workspace) against
    the measured peak of forward + backward, within 15%."""
    config, results = cpu_measurements
    from lingshu_fast.plan.memory import flce_workspace_bytes

    tokens, patches = IMAGES * SIDE * SIDE // 2, IMAGES * SIDE * SIDE
    w = A.Widths.of(config)
    ws = flce_workspace_bytes(w, tokens, A.Split(), "reference", head_trainable=True)
    _, predicted = _predicted(config, policy, "reference", tokens, patches, ws)
    measured = results[policy]["peak"]
    assert abs(predicted / measured - 1) < 0.15, (policy, measured / 2**20, predicted / 2**20)


def test_checkpointing_policies_free_memory(cpu_measurements):
    """Pins that the policies really free memory, measured: selective keeps less than none per layer
    and at the peak, full less than selective (a policy that silently kept everything would fail)."""
    _, results = cpu_measurements
    for name in ("layer0", "block0"):
        none, sel, full = (results[p]["kept"][name] for p in POLICIES)
        assert full < 0.2 * sel and sel < 0.75 * none, (name, none, sel, full)
    assert results["full"]["peak"] < results["selective"]["peak"] < results["none"]["peak"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", POLICIES)
def test_cuda_allocator_matches_prediction(world_of_one_module, policy):
    """The CUDA twin: bf16, the fused kernels' inventory (Liger RMSNorm/SwiGLU/RoPE, varlen attention),
    torch.cuda.memory_allocated per layer and max_memory_allocated for the peak, within 15%."""
    pytest.importorskip("liger_kernel", reason="the fused inventory assumes Liger's kernels on CUDA")
    from lingshu_fast.model.qwen2_5_vl import Qwen25VLModel
    from lingshu_fast.plan.memory import flce_workspace_bytes

    config = _config_7b_widths()
    model = Qwen25VLModel(config, dtype=torch.bfloat16, activation_checkpointing=policy).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    torch.set_default_dtype(torch.bfloat16)
    try:
        batch = _batch(config, "cuda")
    finally:
        torch.set_default_dtype(torch.float32)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    kept = _run(model, batch, torch.cuda.memory_allocated)
    peak = torch.cuda.max_memory_allocated() - base
    w = A.Widths.of(config)
    tokens, patches = IMAGES * SIDE * SIDE // 2, IMAGES * SIDE * SIDE
    layer_pred = tokens * A.decoder_layer_bytes_per_token(w, policy, "fused")
    assert abs(kept["layer1"] / layer_pred - 1) < 0.15, (kept["layer1"] / 2**20, layer_pred / 2**20)
    block_pred = patches * A.vit_block_bytes_per_patch(w, policy, "fused")
    assert abs(kept["block1"] / block_pred - 1) < 0.15, (kept["block1"] / 2**20, block_pred / 2**20)
    ws = flce_workspace_bytes(w, tokens, A.Split(), "fused", head_trainable=True, scalar_loss=True)  # "sum"
    _, predicted = _predicted(config, policy, "fused", tokens, patches, ws)
    assert abs(predicted / peak - 1) < 0.15, (peak / 2**20, predicted / 2**20)


def _state_report(config, freeze, dtype):
    from lingshu_fast.config import load_config
    from lingshu_fast.model.qwen2_5_vl import Qwen25VLModel, param_groups, set_trainable
    from lingshu_fast.train.memory import memory_report
    from lingshu_fast.train.optim import build_optimizer

    model = Qwen25VLModel(config, dtype=dtype)
    set_trainable(model, freeze)
    optimizer = build_optimizer(param_groups(model), load_config("tiny-sft").optim, dp_group=None, model=model)
    optimizer.buffers.zero()
    optimizer.buffers.finish()
    optimizer.step()  # Adam's moments exist after the first update
    return memory_report(model, optimizer, torch.device("cpu"))


@pytest.mark.parametrize("freeze", [[], ["llm"]])
def test_parameter_and_optimizer_bytes_exact(world_of_one_module, freeze):
    """Pins the planner's parameter count per module group (TP=1, whole model) exactly against the
    model at the 7B widths and full vocabulary (built on the meta device: nothing allocated), and its
    parameter, gradient and optimizer bytes exactly against memory_report() of a real bf16 model and
    optimizer (small widths, stage 1's frozen LLM and all-trainable; DP=1: no bucket padding)."""
    from lingshu_fast.config import load_config
    from lingshu_fast.model.config import tiny_hf_config
    from lingshu_fast.model.qwen2_5_vl import Qwen25VLModel, param_groups
    from lingshu_fast.plan.memory import rank_param_numel, state_bytes

    config = _config_7b_widths(vocab=152064)
    with torch.device("meta"):
        model = Qwen25VLModel(config, dtype=torch.bfloat16)
    pieces = A.RankPieces((0, 1), True, True)
    assert rank_param_numel(config, A.Split(), pieces) == {g: sum(p.numel() for p in ps)
                                                           for g, ps in param_groups(model).items()}
    small = tiny_hf_config(text_config=dict(hidden_size=96, intermediate_size=160, num_attention_heads=6,
                                            num_key_value_heads=2, rope_parameters=dict(
                                                rope_type="default", rope_theta=1e4, mrope_section=[2, 3, 3])))
    report = _state_report(small, freeze, torch.bfloat16)
    numel = rank_param_numel(small, A.Split(), A.RankPieces((0, 1, 2), True, True))
    cfg = load_config("tiny-sft", [f"model.freeze=[{','.join(freeze)}]"])
    state = state_bytes(numel, cfg, dp=1, param_bytes=2, with_reference=False)
    assert (state.params, state.grads, state.optimizer) == (report["params"], report["grads"], report["optim"])
    assert state.trainable_numel == report["trainable_numel"]
