"""`LiveBytes`: the live tensor bytes and their peak, measured by tensor lifetimes, cheaply.

A TorchDispatchMode sees every tensor an aten op creates (forward, backward, recompute); each new
storage counts from its creation until Python frees it (a weakref finalizer), so `peak` is the
largest sum of live storages: what torch.cuda.max_memory_allocated reports on a GPU, up to the
allocator's block rounding. Views and in-place results share their input's storage and add nothing;
storages that existed before the mode (parameters) are not counted.

`skip_compute=True` runs the expensive ops (matmuls, attention) on the meta device for their output
shapes and returns uninitialised tensors of those shapes instead: every allocation and lifetime stays
the same, the FLOPs vanish. Values are garbage, so use it for memory only. This lets a test run the
model at the real 7B widths on two CPU cores in seconds.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only

_aten = torch.ops.aten
_EXPENSIVE = {
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
}


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device="meta")


def _empty_like_meta(m: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(m.size(), m.stride(), dtype=m.dtype)


class LiveBytes(TorchDispatchMode):
    def __init__(self, skip_compute: bool = False):
        super().__init__()
        self.skip_compute = skip_compute
        self.live = 0
        self.peak = 0
        self._finalizers: dict[int, weakref.finalize] = {}
        self.skipped_ops = 0

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self._finalizers:
            return
        nbytes = storage.nbytes()
        self.live += nbytes
        self.peak = max(self.peak, self.live)

        def freed(key=key, nbytes=nbytes) -> None:
            self.live -= nbytes
            self._finalizers.pop(key, None)

        self._finalizers[key] = weakref.finalize(storage, freed)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.skip_compute and func in _EXPENSIVE:
            meta_args, meta_kwargs = tree_map_only(torch.Tensor, _meta_like, (args, kwargs))
            out = tree_map_only(torch.Tensor, _empty_like_meta, func(*meta_args, **meta_kwargs))
            self.skipped_ops += 1
        else:
            out = func(*args, **kwargs)
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage._cdata not in inputs:
                    self._track(storage)
        return out
