"""Ahead-of-time compile specs: every Triton kernel declares how CI compiles it for sm_80 and sm_90a.

Each kernel module exposes `aot_specs() -> list[AotSpec]`, one entry per (kernel, shape class,
autotune config) it launches at the 7B model's shapes. tests/test_aot_compile.py compiles every spec
for both targets with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` and checks:
it compiles, fits shared memory (A100 163 KB, H100 227 KB per block), spills no registers
(ptxas -v), and, where `expects_wgmma`, its sm_90a SASS/PTX uses wgmma.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class AotSpec:
    name: str  # e.g. "flce_fwd[H=3584,bf16,BLOCK_V=256]"
    fn: Callable  # the @triton.jit function
    signature: dict[str, str]  # arg name -> triton type string, e.g. {"x_ptr": "*bf16", "n": "i32"}
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    expects_wgmma: bool = False  # True for kernels whose hot loop is a tl.dot
