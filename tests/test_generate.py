"""KV-cache generation (lingshu_fast.model.generate) against transformers and a full recompute.

Tiny random Qwen2.5-VL, fp32 on CPU. Greedy tokens must equal transformers' `generate` exactly:
both run the same fp32 maths, and a flipped argmax would need two logits within ~1e-6 of each
other, which the fixed seeds here do not produce. Log-probs are compared with a packed full
forward at 1e-4 (summation order of a cached vs a packed attention, observed ~1e-6).
"""

import pytest
import torch

import lingshu_fast.model as M
from lingshu_fast.data.prompt import Prompt
from lingshu_fast.model.generate import GenerationOutput, generate
from lingshu_fast.model.testing import DEFAULT_LAYOUT, packed_batch
from lingshu_fast.parallel.spawn import spawn

# two images, one image, text only, and a short text-only prompt: four different lengths
LAYOUT = DEFAULT_LAYOUT + (([], 4),)


pytestmark = pytest.mark.usefixtures("world_of_one")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    config = M.tiny_hf_config()
    hf = Qwen2_5_VLForConditionalGeneration(config).eval()
    folder = str(tmp_path_factory.mktemp("gen") / "hf")
    hf.save_pretrained(folder)
    return hf, folder, packed_batch(config, LAYOUT)


def _prompts(batch):
    return [Prompt(s["input_ids"], s["position_ids"], s["pixel_values"], s["image_grid_thw"])
            for s in batch["samples"]]


def _recompute_logprobs(model, prompt: Prompt, out: GenerationOutput, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) of the generated tokens from one full forward of prompt + response."""
    n_new = len(out.token_ids)
    ids = torch.cat([prompt.input_ids, torch.tensor(out.token_ids)])
    start = int(prompt.position_ids.max()) + 1
    pos = torch.cat([prompt.position_ids, torch.arange(start, start + n_new).expand(3, -1)], dim=1)
    cu = torch.tensor([0, ids.shape[0]], dtype=torch.int32)
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=pos, cu_seqlens=cu, pixel_values=prompt.pixel_values,
                       image_grid_thw=prompt.image_grid_thw, return_logits=True).logits
    t = prompt.input_ids.shape[0]
    logp = torch.log_softmax(logits[t - 1:t - 1 + n_new].float() / temperature, dim=-1)
    return logp, logp.gather(-1, torch.tensor(out.token_ids)[:, None]).squeeze(-1)


def test_greedy_equals_transformers_generate(tiny):
    """Pins: prefill K/V layout (GQA heads, rotated keys), per-row cache offsets for prompts of
    different lengths, the decode-time M-RoPE position (max prompt position + 1 + i, which differs
    from the token index after an image), and image scatter, against transformers token for token."""
    hf, folder, batch = tiny
    model = M.from_pretrained(folder).eval()
    outs = generate(model, _prompts(batch), max_new_tokens=12, stop_token_ids=[])
    for s, out in zip(batch["samples"], outs):
        extra = {k: s[k] for k in ("pixel_values", "image_grid_thw") if s[k] is not None}
        ref = hf.generate(input_ids=s["input_ids"][None], attention_mask=torch.ones_like(s["input_ids"])[None],
                          max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0, **extra)
        assert out.token_ids == ref[0, s["input_ids"].shape[0]:].tolist()
        assert not out.finished and len(out.logprobs) == 12


def test_stop_tokens_and_compaction(tiny):
    """Pins: a stop id ends its row (the stop token kept, finished=True), rows that never stop run
    to max_new_tokens (finished=False), and dropping finished rows from the cache (compaction)
    does not disturb the others' continuations."""
    _, folder, batch = tiny
    model = M.from_pretrained(folder).eval()
    free = generate(model, _prompts(batch), max_new_tokens=10, stop_token_ids=[])
    stop_id = free[1].token_ids[3]
    stopped = generate(model, _prompts(batch), max_new_tokens=10, stop_token_ids=[stop_id])
    for f, s in zip(free, stopped):
        if stop_id in f.token_ids:
            cut = f.token_ids.index(stop_id) + 1
            assert s.token_ids == f.token_ids[:cut] and s.finished
            torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(f.logprobs[:cut]), atol=1e-5, rtol=0)
        else:
            assert s.token_ids == f.token_ids and not s.finished
    assert stopped[1].token_ids[-1] == stop_id and len(stopped[1].token_ids) <= 4


def test_sampling_seeded_logprobs_and_top_p(tiny):
    """Pins: the RL helper's behaviour log-probs equal log_softmax(logits / T) of a full recompute;
    a seed reproduces the samples; top-p never picks a token outside the nucleus."""
    _, folder, batch = tiny
    model = M.from_pretrained(folder).eval()
    prompts = _prompts(batch)
    kwargs = dict(max_new_tokens=8, stop_token_ids=[], temperature=0.8, top_p=0.9, repeats=3)
    first = generate(model, prompts, seed=5, **kwargs)
    again = generate(model, prompts, seed=5, **kwargs)
    other = generate(model, prompts, seed=6, **kwargs)
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    assert [o.token_ids for o in first] != [o.token_ids for o in other]
    assert len(first) == len(prompts) * 3
    for k, out in enumerate(first):
        logp, chosen = _recompute_logprobs(model, prompts[k // 3], out, 0.8)
        torch.testing.assert_close(torch.tensor(out.logprobs), chosen, atol=1e-4, rtol=0)
        # the probability mass strictly above the chosen token is below top_p (it is in the nucleus)
        above = (logp.exp() * (logp > chosen[:, None])).sum(-1)
        assert bool((above < 0.9).all())
    # the repeats of one prompt are different samples, not copies
    assert len({tuple(o.token_ids) for o in first[:3]}) > 1


def test_repeats_share_one_image_encoding(tiny):
    """Pins "images encoded once per prompt and shared by its group": all prompts' images
    go through the vision tower in one call whatever `repeats` is; precomputed `image_embeds` skip
    it; greedy repeats are copies of the single-sample output."""
    _, folder, batch = tiny
    model = M.from_pretrained(folder).eval()
    calls = []
    original = model.encode_images
    model.encode_images = lambda *a: calls.append(1) or original(*a)
    prompts = _prompts(batch)
    single = generate(model, prompts, max_new_tokens=6, stop_token_ids=[])
    grouped = generate(model, prompts, max_new_tokens=6, stop_token_ids=[], repeats=4)
    assert len(calls) == 2  # one ViT call per generate, for 2 image prompts x 4 repeats
    assert [o.token_ids for o in grouped] == [o.token_ids for o in single for _ in range(4)]
    with torch.no_grad():
        embedded = [Prompt(p.input_ids, p.position_ids, image_embeds=(
            original(p.pixel_values, p.image_grid_thw) if p.pixel_values is not None else None)) for p in prompts]
    calls.clear()
    assert [o.token_ids for o in generate(model, embedded, max_new_tokens=6)] == [o.token_ids for o in single]
    assert not calls


def test_generated_image_token_is_an_ordinary_token(tiny):
    """Pins: a model that emits <|image_pad|> (a random or badly tuned policy can) keeps decoding;
    the decode step embeds tokens without the prompt's image-slot check."""
    _, folder, batch = tiny
    model = M.from_pretrained(folder).eval()
    image_id = model.config.image_token_id
    original = model.logits

    def favour_image_token(hidden):
        logits = original(hidden)
        logits[:, image_id] += 1e3
        return logits

    model.logits = favour_image_token
    outs = generate(model, _prompts(batch)[2:], max_new_tokens=3)
    assert all(o.token_ids == [image_id] * 3 for o in outs)


def _pipeline_worker(dims, folder, prompts, stop_ids):
    """tp=2 x pp=2 (sequence parallel on) first; then, in the same processes, pp=2 with two
    interleaved chunks per rank (dp=2): stages 0..3 of one layer each."""
    from lingshu_fast.model.chunks import ModelChunks
    from lingshu_fast.parallel.state import init_parallel

    def run(model):
        greedy = generate(model, prompts, max_new_tokens=8, stop_token_ids=stop_ids)
        sampled = generate(model, prompts, max_new_tokens=8, temperature=1.0, top_p=0.95, seed=11, repeats=2)
        return greedy, sampled

    half = [(0, 2), (2, 4)][dims.pp_rank]
    results = [run(M.from_pretrained(folder, layer_start=half[0], layer_end=half[1], sequence_parallel=True).eval())]
    dims = init_parallel(1, 2)
    chunks = [M.from_pretrained(folder, layer_start=s, layer_end=s + 1).eval() for s in (dims.pp_rank, 2 + dims.pp_rank)]
    results.append(run(ModelChunks(chunks)))
    return results


@pytest.mark.dist
def test_pipeline_equals_single_stage(tiny, tmp_path):
    """Pins: generation through pipeline stages (point-to-point relay of the prefill and of every
    decode step, per-stage K/V caches, images encoded on the first stage only, tokens sampled on
    the last stage and broadcast so every stage's caches and row compaction follow), under TP x PP
    with sequence parallelism and under interleaved chunks (a rank visited twice per step). Every
    rank returns the same outputs as the whole model in one process. Partial sums differ in order
    only through TP: log-probs agree to 1e-5, tokens exactly."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    _, _, batch = tiny
    torch.manual_seed(1)
    folder = str(tmp_path / "hf4")
    Qwen2_5_VLForConditionalGeneration(M.tiny_hf_config(num_hidden_layers=4)).eval().save_pretrained(folder)
    prompts = _prompts(batch)
    model = M.from_pretrained(folder).eval()
    # stop on the second greedy token of prompt 1: a row finishes early and the caches get compacted
    stop_ids = [generate(model, prompts, max_new_tokens=2)[1].token_ids[1]]
    greedy = generate(model, prompts, max_new_tokens=8, stop_token_ids=stop_ids)
    assert greedy[1].finished and len(greedy[1].token_ids) == 2
    sampled = generate(model, prompts, max_new_tokens=8, temperature=1.0, top_p=0.95, seed=11, repeats=2)
    for layout in zip(*spawn(_pipeline_worker, 4, folder, prompts, stop_ids, tp=2, pp=2)):
        for g, s in layout:
            assert [(o.token_ids, o.finished) for o in g] == [(o.token_ids, o.finished) for o in greedy]
            assert [(o.token_ids, o.finished) for o in s] == [(o.token_ids, o.finished) for o in sampled]
            for a, b in zip(s, sampled):
                torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def _tp2_worker(dims, folder, prompts):
    model = M.from_pretrained(folder).eval()
    greedy = generate(model, prompts, max_new_tokens=8, stop_token_ids=[])
    sampled = generate(model, prompts, max_new_tokens=8, temperature=1.0, top_p=0.95, seed=11, repeats=2)
    sp_model = M.from_pretrained(folder, sequence_parallel=True).eval()
    sp_greedy = generate(sp_model, prompts, max_new_tokens=8)
    assert sp_model.layers[0].qkv.sequence_parallel  # switched back on after the call
    return greedy, sampled, sp_greedy


@pytest.mark.dist
def test_tp2_equals_tp1(tiny):
    """Pins: per-rank KV heads, the row-parallel all-reduce, gathered logits and the broadcast of
    sampled tokens (both ranks extend their caches with one token), and sequence parallelism
    switched off while decoding. TP splits matmul reductions: log-probs agree to 1e-5."""
    _, folder, batch = tiny
    prompts = _prompts(batch)
    model = M.from_pretrained(folder).eval()
    greedy = generate(model, prompts, max_new_tokens=8, stop_token_ids=[])
    sampled = generate(model, prompts, max_new_tokens=8, temperature=1.0, top_p=0.95, seed=11, repeats=2)
    ranks = spawn(_tp2_worker, 2, folder, prompts, tp=2)
    for g2, s2, sp2 in ranks:
        assert [o.token_ids for o in g2] == [o.token_ids for o in greedy]
        assert [o.token_ids for o in sp2] == [o.token_ids for o in greedy]
        assert [o.token_ids for o in s2] == [o.token_ids for o in sampled]
        for a, b in zip(s2, sampled):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
