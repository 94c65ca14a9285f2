"""Packing planner: which samples share a micro-batch under a token budget.

The plan is best-fit-decreasing (BFD) over a shuffled window:

1. Shuffle all sample indices with `numpy.random.Generator(PCG64(seed)).permutation(n)`.
2. Cut the shuffled order into consecutive windows of `window` samples (the last one may be
   shorter). Samples longer than `budget` are dropped into `PackPlan.oversize` (they still count
   towards their window's size, so the windows do not depend on which samples are oversize).
3. Within a window, take samples by length descending (ties keep shuffled order) and put each one
   into the open bin with the LEAST remaining space that still fits it (ties: the lowest bin id,
   i.e. the bin opened first); when none fits, open a new bin.
4. At the window's end all its bins are closed: bins never span windows, so a sample is at most
   one window away from its shuffled position and the plan can be computed window by window.

Bins are numbered in the order they are opened; samples in a bin are listed in placement order.
The result is deterministic for (lengths, budget, window, seed), and the numpy path and the native
`lingshu_fast._C.plan_packing` (C++, ordered set of (remaining, bin id)) return identical plans:
the permutation is computed here in Python and handed to both.

The "numpy" backend vectorises the shuffle, the window split and the sorting; the best-fit loop
itself is sequential and keeps the open bins in a sorted Python list of integer keys
`remaining * window + bin` (bisect finds the best fit). Measured faster than a numpy argmin over
the open bins per sample, so it is the fair baseline for the native planner's speed-up.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

__all__ = ["PackPlan", "plan_packing", "load_native"]

_BUILD_HINT = (
    "lingshu_fast._C (the native CPU helpers) is not built: install CMake, a C++17 compiler and "
    "pybind11, then run `pip install --no-build-isolation -e .` (LINGSHU_REQUIRE_NATIVE=1 makes a "
    "failed build an error); or pass backend='numpy'"
)


def load_native(backend: str):
    """The native module for `backend` ("auto" | "native" | "numpy"), or None for the numpy path."""
    if backend not in ("auto", "native", "numpy"):
        raise ValueError(f"backend must be 'auto', 'native' or 'numpy', got {backend!r}")
    if backend == "numpy":
        return None
    try:
        from lingshu_fast import _C
    except ImportError as err:
        if backend == "native":
            raise ImportError(f"{_BUILD_HINT} ({err})") from err
        return None
    return _C


@dataclass(eq=False)  # arrays: identity equality, not an ambiguous element-wise `==`
class PackPlan:
    """`order`: sample indices bin after bin; bin `b` is `order[bin_offsets[b]:bin_offsets[b+1]]`.
    `oversize`: indices longer than the budget (ascending), left out of every bin."""

    order: np.ndarray
    bin_offsets: np.ndarray
    oversize: np.ndarray

    @property
    def num_bins(self) -> int:
        return int(self.bin_offsets.shape[0] - 1)

    def bins(self) -> list[np.ndarray]:
        return np.split(self.order, self.bin_offsets[1:-1]) if self.num_bins else []

    def efficiency(self, lengths: np.ndarray, budget: int) -> float:
        """Real tokens / (bins * budget): the share of the micro-batches' token slots that hold data."""
        if self.num_bins == 0:
            return 0.0
        real_tokens = int(np.asarray(lengths, dtype=np.int64)[self.order].sum())
        return real_tokens / (self.num_bins * int(budget))


def _validate(lengths, budget: int, window: int) -> np.ndarray:
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {list(lengths.shape)}")
    if lengths.size and lengths.min() < 0:
        raise ValueError(f"lengths must be >= 0, got {int(lengths.min())} at index {int(lengths.argmin())}")
    if int(budget) < 1:
        raise ValueError(f"budget (tokens per micro-batch) must be >= 1, got {budget}")
    if int(window) < 1:
        raise ValueError(f"window (samples per shuffle window) must be >= 1, got {window}")
    return lengths


def _plan_numpy(lengths: np.ndarray, permutation: np.ndarray, budget: int, window: int) -> PackPlan:
    n = lengths.shape[0]
    shuffled_len = lengths[permutation]
    window_of = np.arange(n, dtype=np.int64) // window
    # One stable lexsort for all windows: by window, then length descending, then shuffled order.
    processing = np.lexsort((-shuffled_len, window_of))
    fits = shuffled_len[processing] <= budget
    items = permutation[processing][fits]
    item_len = shuffled_len[processing][fits].tolist()
    item_window = window_of[processing][fits]
    oversize = np.sort(permutation[processing][~fits])
    window_bounds = np.searchsorted(item_window, np.arange(window_of[-1] + 2 if n else 1)).tolist()

    bin_of_item = [0] * len(item_len)
    bins_before = 0
    key_scale = max(1, min(window, n))  # a window opens at most this many bins, so bin < key_scale
    for w in range(len(window_bounds) - 1):
        open_keys: list[int] = []  # sorted keys remaining * key_scale + local bin id
        n_bins = 0
        for i in range(window_bounds[w], window_bounds[w + 1]):
            length = item_len[i]
            at = bisect.bisect_left(open_keys, length * key_scale)
            if at == len(open_keys):
                bisect.insort(open_keys, (budget - length) * key_scale + n_bins)
                bin_of_item[i] = bins_before + n_bins
                n_bins += 1
            else:
                key = open_keys.pop(at)
                bisect.insort(open_keys, key - length * key_scale)
                bin_of_item[i] = bins_before + key % key_scale
        bins_before += n_bins

    bin_of_item_np = np.asarray(bin_of_item, dtype=np.int64)
    order = items[np.argsort(bin_of_item_np, kind="stable")]
    bin_offsets = np.zeros(bins_before + 1, np.int64)
    np.cumsum(np.bincount(bin_of_item_np, minlength=bins_before), out=bin_offsets[1:])
    return PackPlan(order=order.astype(np.int64), bin_offsets=bin_offsets, oversize=oversize.astype(np.int64))


def plan_packing(
    lengths: np.ndarray, budget: int, *, window: int = 1024, seed: int = 0, backend: str = "auto"
) -> PackPlan:
    """Plan micro-batches of at most `budget` tokens from per-sample `lengths` (see module docstring).

    `backend`: "auto" (native when built, else numpy), "numpy", or "native" (ImportError with build
    instructions when lingshu_fast._C is missing). Both backends give the identical plan.
    """
    lengths = _validate(lengths, budget, window)
    permutation = np.random.Generator(np.random.PCG64(seed)).permutation(lengths.shape[0]).astype(np.int64)
    native = load_native(backend)
    if native is not None:
        order, bin_offsets, oversize = native.plan_packing(lengths, permutation, int(budget), int(window))
        return PackPlan(order=order, bin_offsets=bin_offsets, oversize=oversize)
    return _plan_numpy(lengths, permutation, int(budget), int(window))
