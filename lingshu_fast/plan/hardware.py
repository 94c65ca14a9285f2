"""The cards the planner knows and every assumption of its time and memory MODEL, in one place.

Datasheet figures (NVIDIA, SXM parts): dense bf16 tensor-core peak, HBM bandwidth, NVLink bandwidth
per GPU and direction, and the InfiniBand NIC per GPU of the usual 8-GPU node (A100: HDR 200 Gb/s,
H100/H200: NDR 400 Gb/s). Memory in GiB as `--gpu-memory-gb` and the metrics use it (an "80GB" H100
exposes 79.6 GiB: the fixed reserve below covers the difference).

Assumptions (not measured here; a GPU run should replace them, see bench/):
- `MFU_ASSUMED`: the share of the bf16 peak the matmuls reach in training, per card.
- `LINK_EFFICIENCY`: the share of the link bandwidth a ring collective reaches (bus bandwidth).
- `DECODE_HBM_EFFICIENCY`: the share of HBM bandwidth a decode step reaches (weights + KV cache read).
- `LAUNCH_S_PER_LAYER`: host/launch latency per decoder layer and decode step.
- `COLLECTIVE_LATENCY_S`: fixed latency per collective call.
- `RESERVE_FIXED_GB`: the CUDA context (~0.6 GB), cuBLAS workspaces and NCCL buffers of the TP/DP/PP
  communicators (~1 GB), none of which torch.cuda.max_memory_allocated sees.
- `FRAGMENTATION`: the caching allocator's slack over the live tensors' peak.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lingshu_fast.config import HARDWARE_PATTERN, ConfigError

GPUS_PER_NODE = 8  # tensor parallelism stays inside a node's NVLink domain


@dataclass(frozen=True)
class Card:
    name: str
    memory_gb: float
    bf16_tflops: float
    hbm_tb_s: float
    nvlink_gb_s: float  # per GPU and direction
    ib_gb_s: float  # per GPU (one NIC each)


CARDS = {
    "a100": Card("A100", 80.0, 312.0, 2.04, 300.0, 25.0),
    "h100": Card("H100", 80.0, 989.0, 3.35, 450.0, 50.0),
    "h200": Card("H200", 141.0, 989.0, 4.80, 450.0, 50.0),
}
MFU_ASSUMED = {"a100": 0.50, "h100": 0.40, "h200": 0.42}
LINK_EFFICIENCY = 0.8
DECODE_HBM_EFFICIENCY = 0.6
LAUNCH_S_PER_LAYER = 1e-4
COLLECTIVE_LATENCY_S = 2e-5
RESERVE_FIXED_GB = 2.0
FRAGMENTATION = 0.05


@dataclass(frozen=True)
class Hardware:
    gpus: int
    card: str  # a key of CARDS
    memory_gb: float

    @property
    def spec(self) -> Card:
        return CARDS[self.card]

    def describe(self) -> str:
        return f"{self.gpus}x {self.spec.name} {self.memory_gb:g}GB"


def parse_hardware(text: str) -> Hardware:
    """`run.hardware` ("8x H100 80GB") as a Hardware; ConfigError when it does not parse."""
    match = HARDWARE_PATTERN.match(text or "")
    if match is None:
        raise ConfigError(f"run.hardware={text!r} must look like '8x H100 80GB' (GPUs x A100|H100|H200 memory GB)")
    return Hardware(int(match.group(1)), match.group(2).lower(), float(match.group(3)))


def resolve_hardware(recipe_hardware: Optional[str], gpus: Optional[int], card: Optional[str],
                     memory_gb: Optional[float]) -> Hardware:
    """Command-line choices over the recipe's `run.hardware`; H100 80GB x 8 when neither says."""
    base = parse_hardware(recipe_hardware) if recipe_hardware else Hardware(8, "h100", CARDS["h100"].memory_gb)
    card = (card or base.card).lower()
    if card not in CARDS:
        raise ConfigError(f"--gpu {card!r} is not one of {', '.join(CARDS)}")
    if memory_gb is None:
        memory_gb = base.memory_gb if card == base.card else CARDS[card].memory_gb
    gpus = gpus if gpus is not None else base.gpus
    if gpus < 1 or memory_gb <= 0:
        raise ConfigError(f"--gpus must be >= 1 and --gpu-memory-gb > 0 (got {gpus}, {memory_gb})")
    return Hardware(gpus, card, float(memory_gb))
