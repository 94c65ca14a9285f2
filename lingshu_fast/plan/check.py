"""The start-up memory check: the planner's estimate for the layout about to be built, before any weight
loads. A layout predicted to exceed the device fails in one line naming the layouts of the same GPU
count that fit; `train.skip_memory_check=true` skips it.

Device memory: `train.device_memory_gb`, else the CUDA device's total; on CPU there is no check unless
it is set (then the estimate is of the CPU path: fp32 tensors, the PyTorch reference ops).
"""
from __future__ import annotations

from lingshu_fast.config import Config, ConfigError
from lingshu_fast.plan.hardware import Hardware
from lingshu_fast.plan.layouts import Layout, evaluate, layout_problem, plan_layouts
from lingshu_fast.plan.memory import GIB
from lingshu_fast.plan.workload import model_config_of


def _device_memory_gb(cfg: Config, local_rank: int):
    if cfg.train.device_memory_gb is not None:
        return cfg.train.device_memory_gb
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(local_rank).total_memory / GIB
    return None


def check_startup_memory(cfg: Config, dims) -> None:
    """Raise ConfigError when this rank's layout is predicted not to fit its device."""
    if cfg.train.skip_memory_check:
        return
    device_gb = _device_memory_gb(cfg, dims.local_rank)
    hf_config = model_config_of(cfg) if device_gb is not None else None
    if hf_config is None:
        return
    import torch

    backend = "fused" if torch.cuda.is_available() else "reference"
    p = cfg.parallel
    lay = Layout(dims.tp, dims.pp, dims.dp, p.virtual_stages, cfg.model.activation_checkpointing, p.pp_schedule,
                 p.sequence_parallel)
    if layout_problem(cfg, hf_config, lay, dims.world) is not None:
        return  # the layout's own checks say what is wrong, with their own messages
    hw = Hardware(dims.world, "h100", device_gb)  # the card only matters for the time model
    mine = evaluate(cfg, hf_config, hw, lay, backend=backend)
    if mine.fits:
        return
    fitting = [q.layout.describe() for q in plan_layouts(cfg, hf_config, hw, backend=backend) if q.fits][:4]
    g = mine.memory.gb()
    raise ConfigError(
        f"predicted peak memory {g['total']:.1f} GB per device for {lay.describe()} exceeds "
        f"{'train.device_memory_gb=' if cfg.train.device_memory_gb else 'the device total '}{device_gb:g} GB "
        f"(params {g['params']:.1f}, grads {g['grads']:.1f}, optimizer {g['optimizer']:.1f}, activations "
        f"{g['activations']:.1f}, other {g['other']:.1f}); layouts of {dims.world} device(s) that fit: "
        + ("; ".join(fitting) if fitting else "none (run `lingshu-fast plan RECIPE --gpus N` for more GPUs)")
        + "; train.skip_memory_check=true runs anyway")
