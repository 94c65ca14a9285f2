"""Reward verifiers and the batch scorer (lingshu_fast/rl/rewards.py).

Pins: the strict format reward, per-task accuracy, recipe parsing errors at start-up, extension by
dotted path, and failure isolation — a verifier that raises, returns NaN, sleeps past its timeout
or ignores SIGALRM scores 0, is counted, and does not hold the batch for its full duration.
Time bounds are generous (2 cores shared with other test runs) but far below the 10 s sleeps.
"""
import textwrap
import time

import numpy as np
import pytest

from lingshu_fast.config import ConfigError
from lingshu_fast.rl.rewards import (
    accuracy_reward,
    format_reward,
    infer_task,
    numeric_reward,
    parse_reward_spec,
    register_reward,
    registered_rewards,
    score_responses,
    shutdown_pool,
)

FORMAT_TABLE = [
    ("<think>reasoning</think><answer>C</answer>", 1.0),
    ("  <think>\nreasoning\n</think>\n<answer> C </answer>\n", 1.0),    # whitespace around/between
    ("<think>r</think><answer>C</answer><|im_end|>", 1.0),              # the stop token, once
    ("<think></think><answer>C</answer>", 0.0),                         # empty thought
    ("<think>r</think><answer>  </answer>", 0.0),                       # empty answer
    ("<think>r</think>text<answer>C</answer>", 0.0),                    # text between
    ("Sure! <think>r</think><answer>C</answer>", 0.0),                  # text before
    ("<think>r</think><answer>C</answer> Hope this helps", 0.0),        # text after
    ("<think>r</think><think>s</think><answer>C</answer>", 0.0),        # two thoughts
    ("<think>r <answer>B</answer></think><answer>C</answer>", 0.0),     # nested answer tag
    ("<answer>C</answer><think>r</think>", 0.0),                        # wrong order
    ("<think>r</think><answer>C", 0.0),                                 # unclosed
    ("", 0.0),
]


@pytest.mark.parametrize("response,expected", FORMAT_TABLE)
def test_format_reward_is_strict(response, expected):
    """The whole response must be exactly one think block then one answer block, both non-empty."""
    assert format_reward(response, {}) == expected


ACCURACY_TABLE = [
    ({"task": "mcq", "answer": "C", "options": ["a", "b", "Tuberculosis"]}, "<answer>(C)</answer>", 1.0),
    ({"task": "mcq", "answer": "Tuberculosis", "options": ["a", "b", "Tuberculosis"]}, "C", 1.0),
    ({"task": "mcq", "answer": "C", "options": ["a", "b", "Tuberculosis"]}, "A or C", 0.0),
    ({"task": "mcq", "answer": "C", "options": ["a", "b", "Tuberculosis"]}, "tubercolosis", 0.0),  # no fallback
    ({"task": "yesno", "answer": "Yes"}, "<answer>yes, there is</answer>", 1.0),
    ({"task": "yesno", "answer": "no"}, "Yes", 0.0),
    ({"task": "open", "answer": "Left lung"}, "<answer>the left lung.</answer>", 1.0),
    ({"task": "open", "answer": ["left lung", "left"]}, "Left", 1.0),
    ({"task": "open", "answer": "left lung"}, "right lung", 0.0),
    ({"task": "numeric", "answer": "1200"}, "The answer is 1,205 mg", 1.0),       # within 1 %
    ({"task": "numeric", "answer": 1200, "rel_tol": 0.0, "abs_tol": 1}, "1,205", 0.0),
    ({"answer": "no"}, "No.", 1.0),                                               # inferred yesno
    ({"answer": "B", "options": {"A": "x", "B": "y"}}, "y", 1.0),                 # inferred mcq
    ({"answer": "B", "task": "quadrant"}, "<answer>B</answer>", 1.0),   # label, letter, options in the prompt
    ({"answer": "B", "task": "quadrant"}, "A", 0.0),
    ({"answer": "yes", "task": "lesion_presence"}, "Yes.", 1.0),
]


@pytest.mark.parametrize("sample,response,expected", ACCURACY_TABLE)
def test_accuracy_dispatch(sample, response, expected):
    assert accuracy_reward(response, sample) == expected


def test_infer_task():
    assert infer_task({"answer": "yes"}) == "yesno"
    assert infer_task({"answer": 3.5}) == "numeric"
    assert infer_task({"answer": "liver"}) == "open"
    assert infer_task({"answer": "A", "options": ["x", "y"]}) == "mcq"
    assert infer_task({"task": "numeric", "answer": "3"}) == "numeric"


def test_numeric_bad_gold_raises():
    with pytest.raises(ValueError):
        numeric_reward("5", {"answer": "unknown"})


def test_parse_spec_names_and_weights(tmp_path, monkeypatch):
    """'name:weight' with the weight after the LAST colon; dotted paths with ':' or '.'."""
    (tmp_path / "my_rewards_a.py").write_text("def length(response, sample):\n    return len(response)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    terms = parse_reward_spec(["format:0.5", "accuracy", "my_rewards_a:length:0.3", "my_rewards_a.length:-1e-1"])
    assert [(t.name, t.weight, t.inline) for t in terms] == [
        ("format", 0.5, True), ("accuracy", 1.0, True),
        ("my_rewards_a:length", 0.3, False), ("my_rewards_a.length", -0.1, False)]


@pytest.mark.parametrize("spec,message", [
    (["formt:1"], "unknown reward 'formt'"),
    (["format:abc"], "bad weight 'abc'"),
    (["format:nan"], "bad weight"),
    (["no_such_pkg_xyz.mod:fn"], "cannot import module 'no_such_pkg_xyz.mod'"),
    (["json:no_such_fn"], "has no callable 'no_such_fn'"),
    (["format", "format:2"], "listed twice"),
    ([], "empty"),
    ("format:1", "must be a list"),
])
def test_parse_spec_errors(spec, message):
    """Recipe mistakes fail at start-up with a message naming the entry."""
    with pytest.raises(ConfigError, match=message):
        parse_reward_spec(spec)


def test_register_reward_decorator():
    @register_reward("test_len_reward_x", inline=True)
    def _len(response, sample):
        return float(len(response))
    assert "test_len_reward_x" in registered_rewards()
    rewards, breakdown, failures = score_responses(["ab", "abcd"], [{}, {}], ["test_len_reward_x:0.5"])
    assert rewards.tolist() == [1.0, 2.0] and failures == 0
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_len_reward_x")(lambda r, s: 0.0)


def test_score_responses_weighted_sum_and_breakdown():
    """rewards = sum weight * breakdown; breakdown holds raw scores (format_rate = mean of 'format')."""
    responses = ["<think>t</think><answer>C</answer>", "C", "<think>t</think><answer>A</answer>", None]
    samples = [{"task": "mcq", "answer": "C", "options": ["x", "y", "z"]}] * 4
    rewards, breakdown, failures = score_responses(responses, samples, ["format:0.5", "accuracy:1.0"])
    np.testing.assert_array_equal(breakdown["format"], [1, 0, 1, 0])
    np.testing.assert_array_equal(breakdown["accuracy"], [1, 1, 0, 0])
    np.testing.assert_array_equal(rewards, [1.5, 1.0, 0.5, 0.0])
    assert rewards.dtype == np.float32 and failures == 0
    with pytest.raises(ValueError, match="3 responses but 2 samples"):
        score_responses(["a", "b", "c"], samples[:2], ["format"])


def test_builtin_failure_counted_inline():
    """A malformed sample makes the built-in raise: that response scores 0, the others still count."""
    samples = [{"task": "mcq", "answer": "Z", "options": ["x", "y"]}, {"task": "yesno", "answer": "yes"}]
    rewards, _, failures = score_responses(["A", "yes"], samples, ["accuracy"])
    assert rewards.tolist() == [0.0, 1.0] and failures == 1


_USER_MODULE = textwrap.dedent('''
    import math, signal, time

    def length(response, sample):
        return len(response) / 10

    def boom(response, sample):
        raise RuntimeError("verifier bug")

    def not_a_number(response, sample):
        return math.nan

    def slow_on_x(response, sample):
        if "x" in response:
            time.sleep(10)
        return 1.0

    def swallow(response, sample):   # a broad except must not swallow the timeout
        try:
            time.sleep(10)
        except Exception:
            pass
        return 1.0

    def deaf(response, sample):      # ignores SIGALRM: only killing the worker stops it
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
        time.sleep(10)
        return 1.0
''')


@pytest.fixture()
def user_rewards(tmp_path, monkeypatch):
    (tmp_path / "user_rewards_fixture.py").write_text(_USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_rewards_fixture"
    shutdown_pool()


def test_user_verifier_in_pool_and_failures(user_rewards):
    """Dotted-path verifiers run in worker processes; raising / NaN -> 0 and counted."""
    m = user_rewards
    responses, samples = ["abc", "abcdefghij"], [{}, {}]
    rewards, breakdown, failures = score_responses(
        responses, samples, [f"{m}:length:2", f"{m}.boom", f"{m}:not_a_number"], timeout_s=2.0, workers=2)
    np.testing.assert_allclose(breakdown[f"{m}:length"], [0.3, 1.0], rtol=1e-6)
    np.testing.assert_allclose(rewards, [0.6, 2.0], rtol=1e-6)
    assert failures == 4


def test_timeout_scores_zero_without_blocking(user_rewards):
    """A 10 s sleep with timeout 0.2 s: that item scores 0 and is counted; the other items keep
    their scores; the batch takes ~0.2 s per slow call, not 10 s."""
    m = user_rewards
    responses = ["x", "ok", "x", "fine", "swallowed"]
    t0 = time.perf_counter()
    rewards, breakdown, failures = score_responses(
        responses[:4], [{}] * 4, [f"{m}:slow_on_x", "format:0.5"], timeout_s=0.2, workers=2)
    assert time.perf_counter() - t0 < 4.0
    assert breakdown[f"{m}:slow_on_x"].tolist() == [0.0, 1.0, 0.0, 1.0] and failures == 2
    t0 = time.perf_counter()
    _, _, failures = score_responses(["s"], [{}], [f"{m}:swallow"], timeout_s=0.2, workers=1)
    assert failures == 1 and time.perf_counter() - t0 < 4.0


def test_worker_ignoring_alarm_is_killed(user_rewards):
    """A verifier that blocks SIGALRM is stopped by the parent's deadline (pool terminated and
    rebuilt): scored 0, counted, and the next batch works again."""
    m = user_rewards
    t0 = time.perf_counter()
    rewards, _, failures = score_responses(["a", "b"], [{}, {}], [f"{m}:deaf", "format"], timeout_s=0.2, workers=2)
    assert time.perf_counter() - t0 < 6.0
    assert failures == 2 and rewards.tolist() == [0.0, 0.0]
    rewards, _, failures = score_responses(["abc"], [{}], [f"{m}:length"], timeout_s=2.0, workers=2)
    assert failures == 0 and rewards.tolist() == pytest.approx([0.3])
