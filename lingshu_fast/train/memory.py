"""`memory_report`: what this rank holds for training, by kind, in bytes (and GiB for the metrics).

- params: every parameter's storage (frozen ones included), in the model's dtype;
- grads: the main-gradient buffers (fp32 by default; padding to a multiple of DP included);
- optim: the optimizer state this rank owns: fp32 masters (bf16 models) and Adam's two moments, a
  1/DP share of them under the distributed optimizer;
- peak: CUDA's `max_memory_allocated` on a GPU; on CPU the process's peak resident set size, which
  also counts the interpreter, libraries and activations (a bound, not the tensors alone).
Targets per trainable bf16 parameter: 2 + 4 + 12/DP bytes with the distributed optimizer.
"""
from __future__ import annotations

import torch

from lingshu_fast.train.metrics import mem_gb

GIB = 2 ** 30


def memory_report(model: torch.nn.Module, optimizer, device: torch.device) -> dict:
    """Bytes held by this rank: params, grads, optim, peak; plus the trainable parameter count."""
    params = list({id(p): p for p in model.parameters()}.values())
    trainable = [p for p in params if p.requires_grad]
    _, grad_bytes = optimizer.buffers.nbytes()
    return {"params": sum(p.numel() * p.element_size() for p in params),
            "params_trainable": sum(p.numel() * p.element_size() for p in trainable),
            "trainable_numel": sum(p.numel() for p in trainable),
            "grads": grad_bytes, "optim": optimizer.nbytes(), "peak": int(mem_gb(device) * GIB)}


def memory_metrics(report: dict) -> dict:
    """The metrics-row fields of a report, in GiB."""
    return {f"mem_{k}_gb": report[k] / GIB for k in ("params", "grads", "optim", "peak")}
