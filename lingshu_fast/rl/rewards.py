"""Reward verifiers for RL with verifiable rewards, and the batch scorer the RL loop calls.

A verifier is `fn(response: str, sample: dict) -> float` (see `RewardFunction`). Built-ins are
registered by name (`mcq`, `yesno`, `exact`, `numeric`, `format`, `accuracy`); users add their own
with `@register_reward("name")` or by a dotted path in the recipe:
`rl.rewards: ["format:0.5", "accuracy:1.0", "mypkg.rewards:my_fn:0.3"]` ("name:weight"; the weight
is the part after the last colon, 1.0 when absent). `parse_reward_spec` resolves everything at
start-up so that a typo fails before the first rollout.

Sample fields the built-ins read: `answer` (str, or a list of accepted strings for `exact`),
`options` (dict or list, for `mcq`; without options the answer must be a letter and any letter A-J
counts), `task` (mcq | yesno | open | numeric, for `accuracy`; inferred when absent or not one of
these, see `infer_task`), `rel_tol` / `abs_tol` (for `numeric`).

Failure isolation (`score_responses`): a verifier that raises, returns a non-finite value, or runs
longer than `timeout_s` scores 0 for that response and is counted in `failures`; the run goes on.
- Built-ins are ours, linear-time and exception-safe: they run in-process (no IPC; the default
  recipe never starts a process).
- Every other verifier runs in a persistent pool of forked worker processes (`multiprocessing.Pool`;
  "fork" as torch's DataLoader does after CUDA is up — the workers never touch CUDA — because
  "spawn"/"forkserver" re-run the user's `__main__` in each worker; "spawn" only where fork is missing).
  A thread could not be stopped: Python cannot kill threads, and a regex stuck in C code holds the
  GIL, freezing the trainer too. In the worker, each call runs under a SIGALRM interval timer
  (`signal.setitimer`), which interrupts sleeps, Python loops and `re` (the regex engine polls for
  signals), so one slow call costs `timeout_s`, not the batch. If a worker stops answering anyway
  (C code that never polls signals, or a verifier that blocks SIGALRM), the parent's deadline —
  the time the batch would take with every call timing out, plus a grace — terminates the pool,
  scores every unfinished user-verifier call 0 and counts it; the next batch starts a fresh pool.
- Verifiers travel to the workers pickled by reference, so they must be module-level functions
  (the dotted-path contract already requires that); the pool is rebuilt when sys.path changes.
"""
from __future__ import annotations

import atexit
import importlib
import math
import multiprocessing
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence, Union

import numpy as np

from lingshu_fast import answers as ex
from lingshu_fast.config import ConfigError


class RewardFunction(Protocol):
    def __call__(self, response: str, sample: dict) -> float: ...


@dataclass(frozen=True)
class RewardTerm:
    name: str            # as written in the recipe (registry name or dotted path)
    weight: float
    fn: Callable[[str, dict], float]
    inline: bool         # True: run in-process (trusted built-in); False: in the worker pool


_REGISTRY: dict[str, tuple[Callable[[str, dict], float], bool]] = {}


def register_reward(name: str, *, inline: bool = False):
    """Decorator registering `fn(response, sample) -> float` under `name`. `inline=True` runs it
    in-process without a timeout: only for verifiers as safe as the built-ins."""
    def wrap(fn):
        if name in _REGISTRY and _REGISTRY[name][0] is not fn:
            raise ValueError(f"reward {name!r} is already registered (by {_REGISTRY[name][0].__module__})")
        _REGISTRY[name] = (fn, inline)
        return fn
    return wrap


def registered_rewards() -> list[str]:
    return sorted(_REGISTRY)


# --------------------------------------------------------------------------- built-in verifiers


def infer_task(sample: dict) -> str:
    """The scoring task: the sample's `task` when it is one (mcq, yesno, open, numeric, ...);
    otherwise — absent, or a category label such as "quadrant" — inferred: options or a single
    letter answer -> mcq; yes/no -> yesno; a number (int/float) -> numeric; else open."""
    task = str(sample.get("task") or "").strip().lower()
    if task in _BY_TASK:
        return task
    answer = sample.get("answer")
    if sample.get("options") or (isinstance(answer, str) and ex.gold_choice(answer, None) is not None):
        return "mcq"
    if isinstance(answer, str) and ex.normalize_yes_no(answer) is not None:
        return "yesno"
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return "numeric"
    return "open"


def _gold_list(sample: dict) -> list[str]:
    answer = sample.get("answer")
    if answer is None:
        raise ValueError("sample has no 'answer'")
    return [str(a) for a in answer] if isinstance(answer, (list, tuple)) else [str(answer)]


@register_reward("mcq", inline=True)
def mcq_reward(response: str, sample: dict) -> float:
    """1 when the single chosen letter equals the gold letter (answer given as letter or text)."""
    gold = ex.gold_choice(sample["answer"], sample.get("options"))
    if gold is None:
        raise ValueError(f"mcq sample: answer {sample['answer']!r} is neither a letter nor an option")
    return float(ex.extract_choice(response, sample.get("options")) == gold)


@register_reward("yesno", inline=True)
def yesno_reward(response: str, sample: dict) -> float:
    gold = ex.normalize_yes_no(str(sample["answer"]))
    if gold is None:
        raise ValueError(f"yesno sample: answer {sample['answer']!r} is not yes/no")
    return float(ex.extract_yes_no(response) == gold)


@register_reward("exact", inline=True)
def exact_reward(response: str, sample: dict) -> float:
    """Normalised exact match (closed/open VQA); `answer` may list several accepted strings."""
    predicted = ex.normalize_text(ex.final_answer(response))
    return float(bool(predicted) and any(predicted == ex.normalize_text(g) for g in _gold_list(sample)))


@register_reward("numeric", inline=True)
def numeric_reward(response: str, sample: dict) -> float:
    """|pred - gold| <= max(rel_tol * |gold|, abs_tol); defaults rel 1% (answers are often
    rounded), abs 1e-6."""
    gold = sample["answer"]
    gold_value = float(gold) if isinstance(gold, (int, float)) else ex.extract_number(str(gold))
    if gold_value is None:
        raise ValueError(f"numeric sample: answer {gold!r} holds no number")
    predicted = ex.extract_number(response)
    if predicted is None:
        return 0.0
    return float(math.isclose(predicted, gold_value, rel_tol=float(sample.get("rel_tol", 1e-2)),
                              abs_tol=float(sample.get("abs_tol", 1e-6))))


_FORMAT_RE = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_FORMAT_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


@register_reward("format", inline=True)
def format_reward(response: str, sample: dict) -> float:
    """1 when the WHOLE response is `<think>…</think><answer>…</answer>` (whitespace around and
    between allowed, one trailing `<|im_end|>` tolerated), each tag exactly once, both non-empty."""
    text = response.strip()
    if text.endswith("<|im_end|>"):
        text = text[: -len("<|im_end|>")]
    if any(text.count(tag) != 1 for tag in _FORMAT_TAGS):
        return 0.0
    m = _FORMAT_RE.fullmatch(text)
    return float(m is not None and bool(m.group(1).strip()) and bool(m.group(2).strip()))


_BY_TASK = {"mcq": mcq_reward, "yesno": yesno_reward, "open": exact_reward, "exact": exact_reward,
            "closed": exact_reward, "numeric": numeric_reward}


@register_reward("accuracy", inline=True)
def accuracy_reward(response: str, sample: dict) -> float:
    """Dispatch on the sample's task (see `infer_task`)."""
    task = infer_task(sample)
    if task not in _BY_TASK:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(_BY_TASK)}")
    return _BY_TASK[task](response, sample)


# --------------------------------------------------------------------------- spec parsing


def _resolve(name: str) -> tuple[Callable[[str, dict], float], bool]:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
    elif "." in name:
        module_name, _, attr = name.rpartition(".")
    else:
        raise ConfigError(f"rl.rewards: unknown reward {name!r}; registered: {', '.join(registered_rewards())}; "
                          "or give a dotted path 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or the user's module failing at import
        raise ConfigError(f"rl.rewards: cannot import module {module_name!r} for reward {name!r}: {err}") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"rl.rewards: {module_name!r} has no callable {attr!r} (reward {name!r})")
    return fn, False


def parse_reward_spec(entries: Union[Sequence[str], Sequence[RewardTerm]]) -> list[RewardTerm]:
    """["format:0.5", "accuracy", "pkg.mod:fn:0.3"] -> RewardTerms; ConfigError on unknown names,
    bad weights, unimportable paths or duplicates."""
    if isinstance(entries, str):
        raise ConfigError("rl.rewards must be a list like ['format:0.5', 'accuracy:1.0'], not a string")
    terms: list[RewardTerm] = []
    for entry in entries:
        if isinstance(entry, RewardTerm):
            terms.append(entry)
            continue
        entry = str(entry).strip()
        name, sep, weight_text = entry.rpartition(":")
        weight = 1.0
        if sep and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", weight_text.strip()):
            weight = float(weight_text)
        elif sep and name in _REGISTRY:
            raise ConfigError(f"rl.rewards: bad weight {weight_text!r} in {entry!r}; write 'name:0.5'")
        else:
            name = entry
        if not name:
            raise ConfigError(f"rl.rewards: empty reward name in {entry!r}")
        if not math.isfinite(weight):
            raise ConfigError(f"rl.rewards: weight of {name!r} must be finite, got {weight_text!r}")
        fn, inline = _resolve(name)
        terms.append(RewardTerm(name, weight, fn, inline))
    names = [t.name for t in terms]
    if len(set(names)) != len(names):
        raise ConfigError(f"rl.rewards: a reward is listed twice: {names}")
    if not terms:
        raise ConfigError("rl.rewards is empty: list at least one reward, e.g. ['accuracy:1.0']")
    return terms


# --------------------------------------------------------------------------- scoring


class _CallTimeout(BaseException):
    """BaseException so that a verifier's `except Exception` cannot swallow the timeout."""


def _on_alarm(signum, frame):
    raise _CallTimeout()


def _safe_call(fn, response: str, sample: dict) -> Optional[float]:
    """fn's finite float, or None when it raised or returned something unusable."""
    try:
        value = float(fn(response, sample))
    except Exception:
        return None
    return value if math.isfinite(value) else None


def _worker_score_chunk(fns: list, responses: list, samples: list, timeout_s: float):
    """In a pool worker: scores[i][j] of verifier j on item i, None on failure or timeout."""
    signal.signal(signal.SIGALRM, _on_alarm)
    out = []
    for response, sample in zip(responses, samples):
        row = []
        for fn in fns:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            try:
                row.append(_safe_call(fn, response, sample))
            except _CallTimeout:
                row.append(None)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        out.append(row)
    return out


_POOL: Optional[Any] = None
_POOL_KEY: tuple = ()
_DEADLINE_GRACE_S = 2.0


def _pool(workers: int):
    """The persistent pool; rebuilt when the worker count or sys.path changed (workers copy
    sys.path at start and must import the verifiers' modules)."""
    global _POOL, _POOL_KEY
    key = (workers, tuple(sys.path))
    if _POOL is None or _POOL_KEY != key:
        shutdown_pool()
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        _POOL = multiprocessing.get_context(method).Pool(workers)
        _POOL_KEY = key
    return _POOL


@atexit.register
def shutdown_pool() -> None:
    """Stop the verifier worker processes (also called at exit, and after a hung worker)."""
    global _POOL
    if _POOL is not None:
        _POOL.terminate()
        _POOL.join()
        _POOL = None


def _score_in_pool(terms: list[RewardTerm], responses: list[str], samples: list[dict],
                   timeout_s: float, workers: int) -> list[list[Optional[float]]]:
    n = len(responses)
    chunk = max(1, math.ceil(n / (workers * 4)))
    fns = [t.fn for t in terms]
    pool = _pool(workers)
    pending = [(i, pool.apply_async(_worker_score_chunk, (fns, responses[i:i + chunk], samples[i:i + chunk], timeout_s)))
               for i in range(0, n, chunk)]
    # Worst case with every call timing out, chunks spread over the workers; 25 % for alarms that
    # fire late and IPC, plus a fixed grace for worker start-up. Only a worker that ignores its
    # alarm can reach it.
    rounds = math.ceil(len(pending) / workers)
    deadline = time.monotonic() + 1.25 * rounds * chunk * len(fns) * timeout_s + _DEADLINE_GRACE_S
    results: list[list[Optional[float]]] = [[None] * len(fns) for _ in range(n)]
    for start, handle in pending:
        try:
            rows = handle.get(timeout=max(0.0, deadline - time.monotonic()))
        except multiprocessing.TimeoutError:
            shutdown_pool()  # a worker ignores its alarm: kill them all; the rest stay None
            break
        except Exception:
            continue  # e.g. a sample that cannot be pickled: this chunk scores 0, counted
        results[start:start + len(rows)] = rows
    return results


def score_responses(responses: Sequence[str], samples: Sequence[dict],
                    spec: Union[Sequence[str], Sequence[RewardTerm]], *, timeout_s: float = 5.0,
                    workers: Optional[int] = None) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    """Weighted reward of each response. Returns (rewards [n] float32, breakdown {name: [n] raw
    unweighted scores}, failures = number of (response, verifier) calls that raised, returned a
    non-finite value or timed out — each scored 0). rewards = sum_name weight * breakdown[name]."""
    if len(responses) != len(samples):
        raise ValueError(f"{len(responses)} responses but {len(samples)} samples")
    terms = parse_reward_spec(spec)
    n = len(responses)
    responses = ["" if r is None else str(r) for r in responses]
    samples = list(samples)
    breakdown = {t.name: np.zeros(n, dtype=np.float32) for t in terms}
    failures = 0
    for term in terms:
        if term.inline:
            for i, (response, sample) in enumerate(zip(responses, samples)):
                value = _safe_call(term.fn, response, sample)
                failures += value is None
                breakdown[term.name][i] = 0.0 if value is None else value
    pooled = [t for t in terms if not t.inline]
    if pooled and n:
        workers = workers or min(4, os.cpu_count() or 1)
        rows = _score_in_pool(pooled, responses, samples, timeout_s, workers)
        for j, term in enumerate(pooled):
            for i in range(n):
                value = rows[i][j]
                failures += value is None
                breakdown[term.name][i] = 0.0 if value is None else value
    rewards = np.zeros(n, dtype=np.float32)
    for term in terms:
        rewards += np.float32(term.weight) * breakdown[term.name]
    return rewards, breakdown, failures
