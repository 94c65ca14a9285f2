"""The model against transformers' Qwen2_5_VLForConditionalGeneration (single process, TP=1, CPU fp32).

Tolerances: 1e-4 on logits (the parity bar). Both sides compute in fp32 with the same maths
(SDPA attention, fp32 norm statistics); what remains is summation order (packed matmuls over
more rows, window-reordered ViT tokens), observed ~1e-6.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import lingshu_fast.model as M
from lingshu_fast.model.checkpoint_io import full_hf_state_dict
from lingshu_fast.model.shard_specs import hf_tensor_shapes
from lingshu_fast.model.testing import hf_logits_per_sample, model_inputs, packed_batch

pytestmark = pytest.mark.usefixtures("world_of_one")


def _hf_checkpoint(tmp_path, tied=False, seed=0):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    config = M.tiny_hf_config(tie_word_embeddings=tied)
    hf = Qwen2_5_VLForConditionalGeneration(config).eval()
    folder = str(tmp_path / f"hf_tied{tied}")
    hf.save_pretrained(folder)
    return hf, folder


@pytest.mark.parametrize("tied", [False, True])
def test_packed_logits_match_transformers_per_sample(tmp_path, tied):
    """Pins: window reordering and its inverse, 2-D vision RoPE, image scatter, M-RoPE sections,
    varlen causal masking across packed samples, GQA head layout in the fused qkv, tied heads."""
    hf, folder = _hf_checkpoint(tmp_path, tied)
    model = M.from_pretrained(folder).eval()
    batch = packed_batch(hf.config)
    reference = hf_logits_per_sample(hf, batch)
    with torch.no_grad():
        out = model(**model_inputs(batch), return_logits=True)
    cu = batch["cu_seqlens"].tolist()
    assert out.hidden_states.shape == (cu[-1], hf.config.text_config.hidden_size)
    for i, ref in enumerate(reference):
        torch.testing.assert_close(out.logits[cu[i]:cu[i + 1]], ref, atol=1e-4, rtol=0)
    # the image-free sample is not disturbed by its packed neighbours' images
    assert out.logits.shape == (cu[-1], hf.config.text_config.vocab_size)


def test_precomputed_image_embeds_equal_pixel_path(tmp_path):
    """Pins: RL encodes each prompt's images once (encode_images) and passes image_embeds."""
    hf, folder = _hf_checkpoint(tmp_path)
    model = M.from_pretrained(folder).eval()
    batch = packed_batch(hf.config)
    inputs = model_inputs(batch)
    with torch.no_grad():
        direct = model(**inputs).hidden_states
        embeds = model.encode_images(inputs["pixel_values"], inputs["image_grid_thw"])
        inputs.update(pixel_values=None, image_embeds=embeds)
        shared = model(**inputs).hidden_states
    assert embeds.shape == (int((batch["input_ids"] == hf.config.image_token_id).sum()), 64)
    torch.testing.assert_close(shared, direct, atol=0, rtol=0)


def test_image_token_count_mismatch_is_clear(tmp_path):
    """Pins: a prompt whose <|image_pad|> count disagrees with its image grid fails with the counts,
    not with a shape error deep in an index_put."""
    hf, folder = _hf_checkpoint(tmp_path)
    model = M.from_pretrained(folder).eval()
    inputs = model_inputs(packed_batch(hf.config))
    inputs["input_ids"] = inputs["input_ids"].clone()
    first = int((inputs["input_ids"] == hf.config.image_token_id).nonzero()[0])
    inputs["input_ids"][first] = 5
    with pytest.raises(ValueError, match="image tokens"):
        model(**inputs)


def _grads(model, batch, seed=1):
    out = model(**model_inputs(batch), return_logits=True)
    weights = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(seed))
    (out.logits * weights).sum().backward()
    return full_hf_state_dict(model, grads=True)


def test_gradients_match_transformers(tmp_path):
    """Pins the backward: Megatron's linear autograd, the fused-weight layout of gradients, the
    image scatter and the window permutation all give transformers' gradients (per sample summed).
    Tolerance 1e-4 relative to each tensor's largest gradient (fp32, summation order only)."""
    from lingshu_fast.model.shard_specs import canonical_name

    hf, folder = _hf_checkpoint(tmp_path)
    hf.train()
    batch = packed_batch(hf.config)
    ours = _grads(M.from_pretrained(folder), batch)
    out = torch.cat([hf(input_ids=s["input_ids"][None], pixel_values=s["pixel_values"],
                        image_grid_thw=s["image_grid_thw"], position_ids=s["position_ids"][:, None]).logits[0]
                     for s in batch["samples"]])
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    reference = {canonical_name(n): p.grad for n, p in hf.named_parameters()}
    assert ours.keys() == reference.keys()
    for name, grad in reference.items():
        scale = grad.abs().max().item() + 1e-12
        torch.testing.assert_close(ours[name] / scale, grad / scale, atol=1e-4, rtol=0, msg=name)


def test_activation_checkpointing_same_gradients(tmp_path):
    """Pins: checkpointed blocks (ViT and LLM) recompute exactly; no gradient is lost."""
    hf, folder = _hf_checkpoint(tmp_path)
    batch = packed_batch(hf.config)
    plain = _grads(M.from_pretrained(folder), batch)
    ckpt_model = M.from_pretrained(folder, activation_checkpointing=True)
    checkpointed = _grads(ckpt_model, batch)
    assert plain.keys() == checkpointed.keys() and len(plain) == len(hf_tensor_shapes(hf.config))
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_freezing_by_group(tmp_path):
    """Pins: stage 1 trains vision + merger only; stage 2-3 all; groups partition all parameters."""
    hf, folder = _hf_checkpoint(tmp_path)
    model = M.from_pretrained(folder)
    groups = M.param_groups(model)
    assert set(groups) == {"vision", "merger", "llm"}
    all_ids = [id(p) for ps in groups.values() for p in ps]
    assert sorted(all_ids) == sorted(id(p) for p in model.parameters())
    assert any(p is model.visual.merger.fc1.weight for p in groups["merger"])
    assert any(p is model.visual.patch_embed.weight for p in groups["vision"])
    M.set_trainable(model, ["llm"])
    grads = _grads(model, packed_batch(hf.config))
    assert all(not p.requires_grad for p in groups["llm"])
    assert all(p.grad is not None for p in groups["vision"] + groups["merger"])
    assert not any(name.startswith("model.") or name == "lm_head.weight" for name in grads)
    M.set_trainable(model, ["vision", "merger"])
    assert all(p.requires_grad for p in groups["llm"]) and not any(p.requires_grad for p in groups["vision"])
    with pytest.raises(ValueError, match="unknown module group"):
        M.set_trainable(model, ["visual"])


@pytest.mark.parametrize("tied", [False, True])
def test_save_then_transformers_load_identical(tmp_path, tied):
    """Pins: un-fusing qkv/gate_up, patch-embed reshape, HF names, index + config + generation config."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf, folder = _hf_checkpoint(tmp_path, tied)
    model = M.from_pretrained(folder)
    out_dir = str(tmp_path / "export")
    M.save_pretrained(model, out_dir, max_shard_bytes=200_000)  # forces several shards
    files = sorted(os.listdir(out_dir))
    assert "model.safetensors.index.json" in files and "generation_config.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1
    with open(os.path.join(out_dir, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shards = {name: load_file(os.path.join(out_dir, name)) for name in set(index["weight_map"].values())}
    assert index["metadata"]["total_size"] == sum(t.nbytes for shard in shards.values() for t in shard.values())
    assert all(key in shards[file] for key, file in index["weight_map"].items())
    assert not os.path.exists(out_dir + ".tmp")
    loaded, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(out_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    reference = hf.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    # and our own loader reads the sharded folder through its index
    again = full_hf_state_dict(M.from_pretrained(out_dir))
    assert all(torch.equal(again[name], tensor) for name, tensor in full_hf_state_dict(model).items())
    # saving over an existing export replaces it (temp folder + rename)
    M.save_pretrained(model, out_dir)
    assert sum(f.endswith(".safetensors") for f in os.listdir(out_dir)) == 1


def test_transformers_in_memory_names_load(tmp_path):
    """Checkpoints keyed `model.language_model.*` / `model.visual.*` load like the saved layout."""
    hf, folder = _hf_checkpoint(tmp_path)
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    renamed = {(k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else
                "model." + k if k.startswith("visual.") else k): v for k, v in tensors.items()}
    save_file(renamed, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    model = M.from_pretrained(folder)
    assert torch.equal(model.layers[1].down_proj.weight, tensors["model.layers.1.mlp.down_proj.weight"])


def test_bad_checkpoints_name_every_offending_tensor(tmp_path):
    """Pins: one error lists missing, unexpected and mis-shaped tensors together (before any weight
    is read), and a non-Qwen2.5-VL config.json is refused by model_type."""
    hf, folder = _hf_checkpoint(tmp_path)
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.0.self_attn.k_proj.bias"]
    tensors["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)
    tensors["visual.blocks.1.attn.qkv.weight"] = torch.zeros(95, 32)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(M.CheckpointError) as err:
        M.from_pretrained(folder)
    message = str(err.value)
    for needle in ("missing (1): model.layers.0.self_attn.k_proj.bias", "unexpected (1): model.layers.9.mlp.up_proj.weight",
                   "visual.blocks.1.attn.qkv.weight: file (95, 32) vs config (96, 32)"):
        assert needle in message
    with open(os.path.join(folder, "config.json")) as f:
        raw = json.load(f)
    raw["model_type"] = "llama"
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(raw, f)
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        M.from_pretrained(folder)


def test_tensor_parallel_divisibility_is_checked():
    """Pins: TP=4 cannot split 2 KV heads; the error names the dimension instead of a Megatron assert."""
    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        M.Qwen25VLModel(M.tiny_hf_config(), tp=4)


@pytest.mark.parametrize("tied", [False, True])
def test_pipeline_stages_compose_to_whole_model(tmp_path, tied):
    """Pins: a layer range per stage; first stage embeds, middle passes hidden states, last norms;
    a tied head on a later stage gets its own copy of the embedding (not written on save)."""
    hf, folder = _hf_checkpoint(tmp_path, tied)
    batch = model_inputs(packed_batch(hf.config))
    whole = M.from_pretrained(folder).eval()
    first = M.from_pretrained(folder, layer_end=1).eval()
    last = M.from_pretrained(folder, layer_start=1).eval()
    assert not hasattr(first, "lm_head") and not hasattr(last, "visual")
    with torch.no_grad():
        mid = first(**batch).hidden_states
        staged = last(hidden_states=mid, position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"],
                      return_logits=True)
        full = whole(**batch, return_logits=True)
    torch.testing.assert_close(staged.logits, full.logits, atol=0, rtol=0)
    assert [layer.layer_id for layer in last.layers] == [1, 2]
    if tied:
        assert torch.equal(last.lm_head_weight, hf.state_dict()["model.language_model.embed_tokens.weight"])
        assert "lm_head.weight" not in full_hf_state_dict(last)


def test_flops_formula():
    """Pins the MFU numerator: dense work linear in tokens, causal attention s(s+1)/2, ViT windows."""
    config = M.tiny_hf_config()
    t = config.text_config
    one = M.forward_flops(config, [10])["llm"]
    two = M.forward_flops(config, [10, 10])["llm"]
    joined = M.forward_flops(config, [20])["llm"]
    attention_10 = t.num_hidden_layers * 2 * 64 * 10 * 11
    assert two == pytest.approx(2 * one)
    assert joined - two == pytest.approx(t.num_hidden_layers * 2 * 64 * (20 * 21 - 2 * 10 * 11))
    dense_per_token = 2 * (t.num_hidden_layers * (64 * 128 + 64 * 64 + 3 * 64 * 128) + 64 * 1024)
    assert one == pytest.approx(10 * dense_per_token + attention_10)
    grid = torch.tensor([[1, 8, 8]])  # 64 patches, one 8x8-patch window = one frame
    vit = M.forward_flops(config, [10], grid)["vit"]
    d, v = 32, config.vision_config
    expected = 2 * 64 * (1176 * d + v.depth * (4 * d * d + 3 * d * 64)) + 2 * 16 * (128 * 128 + 128 * 64)
    expected += 4 * d * v.depth * 64 ** 2
    assert vit == pytest.approx(expected)
    assert M.training_flops(config, [10], grid) == pytest.approx(3 * (one + vit))


def test_pipeline_split_balances_flops_and_counts_the_vit():
    """Pins: every stage gets >= 1 layer, ranges tile [0, L), and the ViT's cost shifts layers off stage 0."""
    from lingshu_fast.model.flops import pipeline_layer_split

    config = M.tiny_hf_config(num_hidden_layers=12, vision_config=dict(hidden_size=256, intermediate_size=512,
                                                                        num_heads=4))
    plain = pipeline_layer_split(config, 3, seq_len=512)
    assert plain[0][0] == 0 and plain[-1][1] == 12 and all(a < b for a, b in plain)
    assert all(plain[i][1] == plain[i + 1][0] for i in range(2))
    with_images = pipeline_layer_split(config, 3, seq_len=512, image_patches=4096)
    assert with_images[0][1] < plain[0][1]
    with pytest.raises(ValueError, match="parallel.pp=13"):
        pipeline_layer_split(config, 13)


def test_dtype_strings():
    """model.dtype in recipes is a string: auto means bf16 on CUDA and fp32 on CPU."""
    from lingshu_fast.model.checkpoint_io import resolve_dtype

    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="float64"):
        resolve_dtype("float64", "cpu")


def test_tiny_config_overrides():
    """The demo passes its tokenizer's ids and vocabulary size; mistakes are caught here, not in a forward."""
    config = M.tiny_hf_config(vocab_size=512, image_token_id=500, vision_start_token_id=501,
                              vision_end_token_id=502, video_token_id=503, eos_token_id=7, num_hidden_layers=2)
    assert config.text_config.vocab_size == 512 and config.image_token_id == 500
    assert config.text_config.eos_token_id == 7 and config.text_config.num_hidden_layers == 2
    with pytest.raises(ValueError, match="must be < vocab_size=512"):
        M.tiny_hf_config(vocab_size=512)
    with pytest.raises(ValueError, match="unknown override 'hidden'"):
        M.tiny_hf_config(hidden=3)
