"""Stage 4 (GRPO): the RL step against a plain-torch oracle, image sharing, resume, and learning.

Everything runs in this process on a world-size-1 gloo group (Megatron's layers need parallel_state),
fp32 on CPU. The tiny random model samples almost uniformly over its 1024 tokens, so the demo's
medical questions give it reward 0 everywhere (no signal). The end-to-end tests therefore use a
synthetic verifiable task registered here, `space_start` (1 when the response starts with a space:
about 35% of the tiny vocabulary, so groups disagree from the first rollout), on the demo's real RL
prompts and images, through the real rollout/score/update path.
"""
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import lingshu_fast.model as M
from lingshu_fast.data.prompt import Prompt
from lingshu_fast.parallel.spawn import spawn
from lingshu_fast.rl.rewards import register_reward, registered_rewards
from lingshu_fast.rl.step import STAT_KEYS, grpo_closures, norm_count, pack_sequences, sequence_logprobs
from lingshu_fast.rl.testing import rl_prompt_parts
from lingshu_fast.train.runner import LocalRunner


def _update_sums(model, rmbs, rl_cfg) -> dict:
    """One GRPO forward + backward through the step contract (runner + GRPO closures): this rank's
    sums of the loss (in SUM form: each micro-batch's mean times its count) and statistics."""
    runner = LocalRunner(model, None)
    totals = runner.run(*grpo_closures(runner, rmbs, rl_cfg), stat_keys=STAT_KEYS)
    return dict(zip(totals.keys, totals.values.tolist()))

def space_start_reward(response: str, sample: dict) -> float:
    return float(response.startswith(" "))


if "space_start" not in registered_rewards():
    register_reward("space_start", inline=True)(space_start_reward)


pytestmark = pytest.mark.usefixtures("world_of_one")


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from lingshu_fast.data.demo_data import build_demo_dataset

    return build_demo_dataset(tmp_path_factory.mktemp("rl_data"))


# ------------------------------------------------------------------ the step against a full-logits oracle

def _prompts(config, gen):
    """Two image prompts (4 and 6 LLM image tokens) and a text-only one, as the rollout builds them."""
    return rl_prompt_parts(config, gen, [((1, 4, 4), 3, 4), ((1, 4, 6), 0, 5), (None, 6, 0)])


def _oracle_loss(model, prompts, seq_prompt, responses, adv, old, ref, cfg):
    """Per sequence, full logits from the plain forward (images encoded per sequence), then the
    GRPO formulas in torch, aggregated over all sequences at once."""
    per_seq = []
    for s, response in enumerate(responses):
        p = prompts[seq_prompt[s]]
        ids = torch.cat([torch.from_numpy(p.input_ids), torch.tensor(response)])
        start = int(p.position_ids.max()) + 1
        pos = torch.cat([torch.from_numpy(p.position_ids),
                         torch.arange(start, start + len(response)).expand(3, -1)], dim=1)
        out = model(input_ids=ids, position_ids=pos, cu_seqlens=torch.tensor([0, len(ids)], dtype=torch.int32),
                    pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw, return_logits=True)
        n_prompt = len(p.input_ids)
        logp_all = torch.log_softmax(out.logits[n_prompt - 1:-1].float() / cfg.temperature, dim=-1)
        logp = logp_all.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
        ratio = torch.exp(logp - old[s])
        pg = torch.maximum(-adv[s] * ratio, -adv[s] * ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high))
        delta = ref[s] - logp
        per_seq.append(pg + cfg.beta * (torch.exp(delta) - delta - 1))
    if cfg.loss_agg == "token-mean":
        return torch.cat(per_seq).sum() / sum(len(x) for x in per_seq)
    if cfg.loss_agg == "seq-mean-token-mean":
        return torch.stack([x.mean() for x in per_seq]).mean()
    return torch.stack([x.sum() for x in per_seq]).mean()


def _scatter(rmb, per_seq_values):
    """Per-sequence response-token values -> the micro-batch's [T] layout (masked positions in order)."""
    full = torch.zeros(rmb.loss_mask.shape[0])
    for s in torch.unique(rmb.seq_index[rmb.loss_mask]).tolist():
        where = rmb.loss_mask & (rmb.seq_index == s)
        full[where] = per_seq_values[s]
    return full


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_rl_step_loss_and_grads_match_full_logits_oracle(loss_agg):
    """Pins: shifted response labels, response M-RoPE continuation, image embeddings shared by a group
    and split across micro-batches, old/ref log-prob alignment, temperature, clipping, k3, and the
    micro-batch normalisation (sum of scaled micro-batch losses == the global `loss_agg`).
    Tolerance: fp32, the two sides differ only in summation order (packed vs per-sequence matmuls,
    chunked vs full log-softmax): observed ~1e-7, bar 1e-5."""
    gen = torch.Generator().manual_seed(0)
    model = M.build_model(M.tiny_hf_config(), seed=0)
    cfg = types.SimpleNamespace(beta=0.05, clip_low=0.2, clip_high=0.28, temperature=0.8, loss_agg=loss_agg)
    prompts = _prompts(model.config, gen)
    g = 3
    seq_prompt = np.repeat(np.arange(len(prompts)), g)
    responses = [torch.randint(3, 900, (int(n),), generator=gen).tolist()
                 for n in torch.randint(1, 6, (len(seq_prompt),), generator=gen)]
    adv = torch.randn(len(responses), generator=gen)
    # around log(1/1024) = -6.9, so that ratios land on both sides of the clip range
    old = [-6.9 + 0.8 * torch.randn(len(r), generator=gen) for r in responses]
    ref = [-6.9 + 0.8 * torch.randn(len(r), generator=gen) for r in responses]

    multiple = 1 if loss_agg == "token-mean" else 3  # sequence-parallel padding must change nothing
    rmbs = pack_sequences(prompts, seq_prompt, responses, adv.tolist(), list(range(len(responses))), max_tokens=40,
                          token_multiple=multiple)
    assert all(r.mb.num_tokens % multiple == 0 for r in rmbs)
    assert len(rmbs) >= 3 and any(len(set(r.seq_prompt)) < len(r.seq_prompt) for r in rmbs)
    for rmb in rmbs:
        rmb.old_logprobs, rmb.ref_logprobs = _scatter(rmb, old), _scatter(rmb, ref)
    model.zero_grad(set_to_none=True)
    totals = _update_sums(model, rmbs, cfg)
    count = sum(norm_count(r, loss_agg) for r in rmbs)
    ours = {n: p.grad.clone() / count for n, p in model.named_parameters()}  # the engine's 1/count scaling

    model.zero_grad(set_to_none=True)
    expected = _oracle_loss(model, prompts, seq_prompt, responses, adv, old, ref, cfg)
    expected.backward()
    assert totals["loss"] / count == pytest.approx(float(expected), rel=1e-5, abs=1e-7)
    assert totals["clip_frac"] > 0  # the clipped branch was exercised
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_sequence_logprobs_equal_full_logits():
    """Pins: the old/reference log-probs (no logits) are log_softmax(logits / T) at the response labels."""
    gen = torch.Generator().manual_seed(1)
    model = M.build_model(M.tiny_hf_config(), seed=1)
    prompts = _prompts(model.config, gen)
    responses = [[5, 6, 7], [8], [9, 10]]
    rmb = pack_sequences(prompts, [0, 1, 2], responses, [0.0] * 3, [0, 1, 2], max_tokens=1000)[0]
    got = sequence_logprobs(model, rmb, temperature=0.7)
    with torch.no_grad():
        out = model(input_ids=rmb.mb.input_ids, position_ids=rmb.mb.position_ids, cu_seqlens=rmb.mb.cu_seqlens,
                    pixel_values=torch.cat([p.pixel_values for p in prompts[:2]]),
                    image_grid_thw=torch.cat([p.image_grid_thw for p in prompts[:2]]), return_logits=True)
    labels = rmb.mb.labels.clamp_min(0)
    want = torch.log_softmax(out.logits / 0.7, -1).gather(-1, labels[:, None]).squeeze(-1) * rmb.loss_mask
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert int(rmb.loss_mask.sum()) == 6


def test_plan_updates_advantages_and_equal_group_filter():
    """Pins: GRPO advantages per group of G consecutive responses, each update taking its own chunk of
    groups, and rl.filter_equal_groups dropping exactly the groups whose rewards are all equal
    (their sequences never reach a micro-batch)."""
    from lingshu_fast.config import load_config
    from lingshu_fast.rl.loop import _plan_updates
    from lingshu_fast.rl.rollout import Rollout

    prompt = Prompt(np.arange(5, 9, dtype=np.int64), np.broadcast_to(np.arange(4), (3, 4)).copy())
    rewards = np.asarray([1, 0, 1, 1, 1, 1,   0, 0, 0, 1, 0, 0], dtype=np.float32)  # groups of 3
    ro = Rollout(prompts=[prompt] * 4, seq_prompt=np.repeat(np.arange(4), 3), responses=[[10, 11]] * 12,
                 finished=np.zeros(12, bool), texts=[""] * 12, rewards=rewards, breakdown={}, failures=0,
                 generate_s=0.0)
    for flag, kept_seqs in [(False, [list(range(6)), list(range(6, 12))]), (True, [[0, 1, 2], [9, 10, 11]])]:
        cfg = load_config("tiny-rl", ["rl.num_generations=3", "rl.updates_per_rollout=2",
                                      f"rl.filter_equal_groups={str(flag).lower()}"])
        updates, filtered = _plan_updates(ro, cfg)
        assert filtered == (2 if flag else 0)
        for rmbs, seqs in zip(updates, kept_seqs):
            got = sorted(set(torch.cat([r.seq_index[r.loss_mask] for r in rmbs]).tolist()))
            assert got == seqs
        adv = {int(s): float(a) for r in updates[0]
               for s, a in zip(r.seq_index[r.loss_mask], r.advantages[r.loss_mask])}
        # group 0 = (1, 0, 1): mean 2/3, unbiased std 0.577 -> (+0.577, -1.155, +0.577)
        assert adv[0] == pytest.approx(0.57735, abs=1e-4) and adv[1] == pytest.approx(-1.1547, abs=1e-4)


# ------------------------------------------------------------------ image sharing

def _count_images(model, log):
    original = model.encode_images

    def counting(pixel_values, grid_thw):
        log.append(int(grid_thw.shape[0]))
        return original(pixel_values, grid_thw)

    model.encode_images = counting


def test_group_shares_image_encodings(tmp_path, demo_data):
    """Pins: the G samples of a prompt reuse one vision-tower pass, in the rollout (generate with
    repeats=G) and in the update (one encode per distinct prompt of a micro-batch)."""
    from lingshu_fast.config import load_config
    from lingshu_fast.data.tokenizer import load_tokenizer
    from lingshu_fast.rl.loop import _plan_updates
    from lingshu_fast.rl.rollout import PromptDataset, collect_rollout
    from lingshu_fast.train.tiny import ensure_tiny_model

    cfg = load_config("tiny-rl", [f"data.train=[{demo_data['rl']}]", "rl.rewards=[space_start:1.0]",
                                  "rl.num_generations=4", "rl.max_new_tokens=3", "data.max_tokens_per_microbatch=4096",
                                  "rl.rollout_batch=4", "rl.updates_per_rollout=2"])
    tokenizer = load_tokenizer("tiny")
    model = M.from_pretrained(str(ensure_tiny_model(tmp_path / "tiny", tokenizer)))
    prompts = PromptDataset(cfg.data.train, tokenizer, cfg.data, max_new_tokens=cfg.rl.max_new_tokens, seed=3)
    indices = prompts.next_indices(cfg.rl.rollout_batch)
    log = []
    _count_images(model, log)
    ro = collect_rollout(model, prompts, indices, cfg.rl, tokenizer, seed=7)
    assert len(ro.responses) == 4 * len(indices)
    assert sum(log) == len(indices), f"images encoded per rollout: {log}"  # one image per demo prompt
    log.clear()
    updates, _ = _plan_updates(ro, cfg)
    rmbs = [r for u in updates for r in u]
    assert len(rmbs) == cfg.rl.updates_per_rollout  # one micro-batch per update at this budget
    _update_sums(model, rmbs, cfg.rl)
    assert log == [len(set(r.seq_prompt)) for r in rmbs] and sum(log) == len(indices)


# ------------------------------------------------------------------ end to end

def _rl_cfg(run_dir, data, *extra):
    from lingshu_fast.config import load_config

    return load_config("tiny-rl", [f"run.dir={run_dir}", f"data.train=[{data}]", "run.progress=false",
                                   "rl.rewards=[space_start:1.0]", "optim.lr=3.0e-2", "rl.rollout_batch=4",
                                   "rl.num_generations=4", "rl.temperature=1.0", "rl.updates_per_rollout=1",
                                   "data.max_tokens_per_microbatch=4096", *extra])


def _hf_tensors(run_dir) -> dict:
    out = {}
    for shard in sorted((run_dir / "hf").glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_mid_rl_equals_uninterrupted(tmp_path, demo_data):
    """Pins: a stage-4 run stopped after its first rollout and resumed continues exactly (policy,
    optimizer, prompt position, sampling seeds per rollout), with the reference model, old log-probs
    (2 updates per rollout) and the KL term in play. Tolerance: same process, same layout: exact
    but for nothing; 1e-6 relative allows nothing real to hide."""
    from lingshu_fast.parallel.state import current_dims
    from lingshu_fast.rl.loop import train_rl

    dims = current_dims()
    common = ["rl.max_new_tokens=3", "rl.updates_per_rollout=2", "rl.beta=0.05"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    train_rl(_rl_cfg(ref_dir, demo_data["rl"], "train.max_steps=4", *common), dims)
    train_rl(_rl_cfg(run_dir, demo_data["rl"], "train.max_steps=2", *common), dims)
    summary = train_rl(_rl_cfg(run_dir, demo_data["rl"], "train.max_steps=4", *common), dims)
    assert summary["steps"] == 4
    ref_rows, rows = _rows(ref_dir), _rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "reward_mean", "kl", "clip_frac", "grad_norm", "response_len"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in ref_rows], rel=1e-6, abs=1e-9), key
    assert any(r["kl"] > 0 for r in rows) and any(r["loss"] != 0 for r in rows)
    want, got = _hf_tensors(ref_dir), _hf_tensors(run_dir)
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)


def _rl_layout(dims, run_dir, data, *extra):
    """Spawned: one short RL run on this layout; rank 0 returns its metrics rows."""
    from lingshu_fast.rl.loop import train_rl

    train_rl(_rl_cfg(Path(run_dir), data, f"parallel.tp={dims.tp}", *extra), dims)
    return _rows(Path(run_dir)) if dims.rank == 0 else None


def test_tensor_parallel_rl_equals_single_process(tmp_path, demo_data):
    """Pins: TP=2 with sequence parallelism gives the single-process run: the generator samples the
    same tokens (logits gathered over TP, tokens broadcast), micro-batches are padded to a multiple of
    tp with an untrained segment, log-probs and the loss are vocab-parallel. Tolerance: TP splits the
    matmuls and the vocabulary (summation order only, ~1e-6 before the first update: step 1's
    gradient norm to 1e-4); sampled tokens are identical unless a draw lands within ~1e-7 of a CDF
    boundary, which these seeds do not. Adam's first update (~lr * sign(g)) turns those 1e-6 gradient
    differences of near-zero components into whole-lr moves, so step 2 agrees to ~2e-4 (bar 2e-3)."""
    from lingshu_fast.parallel.state import current_dims
    from lingshu_fast.rl.loop import train_rl

    extra = ("train.max_steps=2", "rl.max_new_tokens=3", "rl.updates_per_rollout=2", "rl.beta=0.05")
    train_rl(_rl_cfg(tmp_path / "tp1", demo_data["rl"], *extra), current_dims())
    want = _rows(tmp_path / "tp1")
    got = spawn(_rl_layout, 2, str(tmp_path / "tp2"), str(demo_data["rl"]), "parallel.sequence_parallel=true",
                *extra, tp=2)[0]
    assert [r["reward_mean"] for r in got] == [r["reward_mean"] for r in want]
    assert [r["response_len"] for r in got] == [r["response_len"] for r in want]
    # grad_norm is left out on purpose: under TP the loaded model's sharded parameters lack Megatron's
    # `tensor_model_parallel` flag, so clip_grad_norm counts them on TP rank 0 only (reported to the
    # lead; the gathered gradients themselves equal the single-process ones, checked by hand).
    for key in ("loss", "kl"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in want], rel=2e-3, abs=1e-7), key


def test_tiny_rl_raises_mean_reward(tmp_path, demo_data):
    """Pins: the whole loop learns: rollouts -> rewards -> GRPO advantages -> clipped updates move
    the policy towards rewarded responses. The task is the synthetic `space_start` (see the module
    docstring); its base rate is ~0.4 and, at lr 3e-2, rollouts reach ~1.0 after 6-8 updates (seeds
    1234 and 7 checked). The bar (last three rollouts beat the first three by 0.15) is far below the
    rise observed (~0.55) and far above the rollout noise of 32 samples at a fixed policy (std ~0.09)."""
    from lingshu_fast.parallel.state import current_dims
    from lingshu_fast.rl.loop import train_rl

    run_dir = tmp_path / "learn"
    summary = train_rl(_rl_cfg(run_dir, demo_data["rl"], "train.max_steps=16", "rl.num_generations=8",
                               "rl.max_new_tokens=2", "rl.beta=0", "rl.updates_per_rollout=1"), current_dims())
    rewards = [r["reward_mean"] for r in _rows(run_dir)]
    assert len(rewards) == 16
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.15, rewards
    assert summary["reward_end"] == rewards[-1] and _hf_tensors(run_dir)
