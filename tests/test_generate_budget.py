"""Generation under a memory budget, and one host sync per decode step (lingshu_fast.model.generate).

Tiny random Qwen2.5-VL, fp32 on CPU. Splitting the prompts into passes changes no greedy token (each
row's arithmetic is its own: fp32, the same order), so the budgeted outputs must equal the
unbudgeted ones exactly; the cache's peak bytes must stay under the budget, which the unbudgeted run
exceeds (otherwise the test would not test the split).
"""
import contextlib

import pytest
import torch

import lingshu_fast.model as M
from lingshu_fast.data.prompt import Prompt
from lingshu_fast.model.generate import generate, pass_bytes
from lingshu_fast.model.testing import DEFAULT_LAYOUT, packed_batch

pytestmark = pytest.mark.usefixtures("world_of_one")
LAYOUT = DEFAULT_LAYOUT + (([], 4), ([(1, 4, 4)], 11))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    config = M.tiny_hf_config()
    folder = str(tmp_path_factory.mktemp("budget") / "hf")
    Qwen2_5_VLForConditionalGeneration(config).eval().save_pretrained(folder)
    batch = packed_batch(config, LAYOUT)
    prompts = [Prompt(s["input_ids"], s["position_ids"], s["pixel_values"], s["image_grid_thw"])
               for s in batch["samples"]]
    return M.from_pretrained(folder).eval(), prompts


def test_budget_splits_passes_and_keeps_greedy_outputs(setup):
    model, prompts = setup
    kwargs = dict(max_new_tokens=12, repeats=3, temperature=0.0)
    whole, split = {}, {}
    want = generate(model, prompts, **kwargs, stats=whole)
    budget = max(pass_bytes(model, [len(p.input_ids)], 3, 12) for p in prompts) + 1
    got = generate(model, prompts, **kwargs, memory_budget_bytes=budget, stats=split)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for a, b in zip(got, want):  # packed prefill over fewer prompts: summation order only
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert split["passes"] > 1 and whole["passes"] == 1
    assert split["peak_cache_bytes"] <= budget < whole["peak_cache_bytes"]
    with pytest.raises(ValueError, match="raise rl.rollout_memory_gb"):
        generate(model, prompts, **kwargs, memory_budget_bytes=budget // 4)


@contextlib.contextmanager
def _count_host_syncs():
    """Counts the tensor methods that wait for the device: item, tolist, cpu, numpy, bool/int/float."""
    counts = {"n": 0}
    names = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def wrap(fn):
        def counted(self, *args, **kwargs):
            counts["n"] += 1
            return fn(self, *args, **kwargs)
        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def test_one_host_sync_per_decode_step(setup):
    """Pins the decode loop's device->host traffic: the difference between a 20-step and a 6-step
    generation (no stop token, so every step runs) is at most one sync per extra step; the rest is
    the prefill and the final read of the outputs, the same for both lengths."""
    model, prompts = setup
    syncs = {}
    for steps in (6, 20):
        stats = {}
        with _count_host_syncs() as counts:
            generate(model, prompts, max_new_tokens=steps, repeats=2, temperature=0.0, stats=stats)
        syncs[steps] = counts["n"]
        assert stats["host_syncs"] == steps - 1  # the engine's own count: one per decode step
    assert (syncs[20] - syncs[6]) / (20 - 6) <= 1.0, syncs
