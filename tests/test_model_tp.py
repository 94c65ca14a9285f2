"""Tensor parallelism: TP=2 over gloo equals TP=1 (forward, gradients, save, random init),
with and without sequence parallelism (the SP runs also checkpoint activations: full, and selective,
whose dropped MLP activation is a row-parallel layer's saved input), and with a vision tower that TP
cannot divide (replicated on both ranks).

One spawn runs every TP=2 check (a spawn costs ~8 s). Tolerances: TP splits each matmul's
reduction (row-parallel layers sum two partial products) so fp32 results differ from TP=1 by
rounding only: 1e-5 absolute on logits of size ~1, 1e-5 relative on gradients.
"""
import os

import pytest
import torch
from safetensors.torch import load_file

import lingshu_fast.model as M
from lingshu_fast.model.checkpoint_io import full_hf_state_dict
from lingshu_fast.model.testing import DEFAULT_LAYOUT, model_inputs, packed_batch
from lingshu_fast.parallel.spawn import spawn


def _forward_backward(model, batch):
    out = model(**batch, return_logits=True)
    weights = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(7))
    (out.logits * weights).sum().backward()
    return out.logits.detach(), out.hidden_states.detach(), full_hf_state_dict(model, grads=True)


def _tp2_worker(dims, hf_folder, odd_folder, batch, out_folder):
    assert dims.tp == 2
    model = M.from_pretrained(hf_folder)
    logits, hidden, grads = _forward_backward(model, batch)
    # each rank holds half the vocabulary of the head and half the heads of the fused qkv
    vocab = model.config.text_config.vocab_size
    assert model.lm_head_weight.shape[0] == vocab // 2
    assert model.vocab_start_end == (dims.tp_rank * vocab // 2, (dims.tp_rank + 1) * vocab // 2)
    M.save_pretrained(model, os.path.join(out_folder, "tp2_export"))
    M.save_pretrained(M.build_model(model.config, seed=3), os.path.join(out_folder, "tp2_random"))
    sp_model = M.from_pretrained(hf_folder, sequence_parallel=True, activation_checkpointing=True)
    sp_results = _forward_backward(sp_model, batch)
    # the residual stream really is split: each rank's first layer sees T/2 tokens
    seen = []
    sp_model.layers[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    with torch.no_grad():
        sp_model(**batch)
    assert seen == [batch["input_ids"].shape[0] // 2]
    selective = _forward_backward(M.from_pretrained(hf_folder, sequence_parallel=True,
                                                    activation_checkpointing="selective"), batch)
    odd_model = M.from_pretrained(odd_folder)  # ViT MLP width 63: not split over 2 ranks -> replicated
    assert odd_model.visual.tp == 1 and odd_model.layers[0].qkv.weight.shape[0] == (4 + 2 * 2) * 16 // 2
    odd_results = _forward_backward(odd_model, batch)
    M.save_pretrained(odd_model, os.path.join(out_folder, "odd_export"))
    return ((logits, hidden, grads), sp_results, odd_results, selective) if dims.tp_rank == 0 else None


def _read_export(folder):
    tensors = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(folder, name)))
    return tensors


@pytest.mark.dist
def test_tp2_equals_tp1_forward_gradients_save_and_init(tmp_path, request):
    """Pins: per-rank q/kv head slices of the fused qkv (GQA), [gate; up] shards, the ViT's
    3-part qkv, row-parallel biases added once, vocab-sharded embedding/head, gathered logits,
    un-sharding on save, and a random init that does not depend on the TP layout."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    config = M.tiny_hf_config()
    hf = Qwen2_5_VLForConditionalGeneration(config).eval()
    hf_folder = str(tmp_path / "hf")
    hf.save_pretrained(hf_folder)
    # 108 tokens: even, so sequence parallelism can split them over 2 ranks
    batch = model_inputs(packed_batch(config, DEFAULT_LAYOUT[:2] + (([], 10),)))
    assert batch["input_ids"].shape[0] % 2 == 0

    torch.manual_seed(1)
    odd_hf = Qwen2_5_VLForConditionalGeneration(M.tiny_hf_config(vision_config=dict(intermediate_size=63))).eval()
    odd_folder = str(tmp_path / "hf_odd_vision")
    odd_hf.save_pretrained(odd_folder)

    (tp2, sp2, odd2, sel2), _ = spawn(_tp2_worker, 2, hf_folder, odd_folder, batch, str(tmp_path), tp=2)

    request.getfixturevalue("world_of_one")  # after the spawn: the in-process world comes second
    logits1, hidden1, grads1 = _forward_backward(M.from_pretrained(hf_folder), batch)
    odd1 = _forward_backward(M.from_pretrained(odd_folder), batch)
    for (logits2, hidden2, grads2), (logits1, hidden1, grads1) in ((tp2, (logits1, hidden1, grads1)),
                                                                     (sp2, (logits1, hidden1, grads1)), (odd2, odd1),
                                                                     (sel2, (logits1, hidden1, grads1))):
        torch.testing.assert_close(logits2, logits1, atol=1e-5, rtol=0)
        torch.testing.assert_close(hidden2, hidden1, atol=1e-5, rtol=0)
        assert grads2.keys() == grads1.keys()
        for name in grads1:
            scale = grads1[name].abs().max().item() + 1e-12
            torch.testing.assert_close(grads2[name] / scale, grads1[name] / scale, atol=1e-5, rtol=0, msg=name)

    for export, reference in (("tp2_export", hf), ("odd_export", odd_hf)):
        exported = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / export)).state_dict()
        for name, tensor in reference.state_dict().items():
            assert torch.equal(exported[name], tensor), name

    M.save_pretrained(M.build_model(config, seed=3), str(tmp_path / "tp1_random"))
    random1, random2 = _read_export(str(tmp_path / "tp1_random")), _read_export(str(tmp_path / "tp2_random"))
    assert random1.keys() == random2.keys()
    assert all(torch.equal(random1[k], random2[k]) for k in random1)
    assert random1["model.norm.weight"].eq(1).all() and random1["visual.blocks.0.attn.qkv.bias"].eq(0).all()


def _pp2_save_worker(dims, hf_folder, out_folder):
    from lingshu_fast.model.flops import pipeline_layer_split

    start, end = pipeline_layer_split(M.load_hf_config(hf_folder), dims.pp)[dims.pp_rank]
    model = M.from_pretrained(hf_folder, layer_start=start, layer_end=end)
    M.save_pretrained(model, out_folder, max_shard_bytes=300_000)
    return (start, end, model.pre_process, model.post_process)


@pytest.mark.dist
def test_pp2_stages_save_one_complete_folder(tmp_path):
    """Pins: each pipeline stage writes its own tensors (HF layer numbering), rank 0 indexes all of
    them; a tied head's last-stage copy is not written twice."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(2)
    hf = Qwen2_5_VLForConditionalGeneration(M.tiny_hf_config(tie_word_embeddings=True)).eval()
    hf_folder, out = str(tmp_path / "hf"), str(tmp_path / "pp2_export")
    hf.save_pretrained(hf_folder)
    stages = spawn(_pp2_save_worker, 2, hf_folder, out, pp=2)
    assert stages[0][0] == 0 and stages[0][1] == stages[1][0] and stages[1][1] == 3
    assert stages[0][2:] == (True, False) and stages[1][2:] == (False, True)
    loaded, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for name, tensor in hf.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
