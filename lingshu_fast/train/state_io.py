"""Model and optimizer state in a layout-independent form: written by Hugging Face tensor name with
global shapes, read back under any (TP, PP, DP) layout the model allows.

A checkpoint holds one folder per kind of tensor, each laid out like an HF safetensors folder (whole
tensors under their HF names, in `part-rank*.safetensors` files):
- `model/`: every parameter's value (frozen ones included), in the model's dtype;
- `master/`: the fp32 main parameters of low-precision (bf16) parameters (absent for fp32 models,
  whose parameters are their own masters);
- `exp_avg/`, `exp_avg_sq/`: Adam's moments (absent before the first optimizer update).

Writing: `collect_state` (collective) then `write_tensors` (no communication: it may run in a
background thread). Tensors are TP-gathered as for an HF export (`full_hf_state_dict`); optimizer
state, which the distributed optimizer spreads over DP ranks, is first all-gathered over DP one grad
bucket at a time (never the whole optimizer at once). Each HF tensor is written by one rank of its
stage's TP x DP group, chosen round-robin, so every rank writes its share of the bytes.

Reading (every rank, no communication). Each parameter reads only its own TP slice (the loader of
`from_pretrained`: `safe_open(...).get_slice`), then, for optimizer state, only the ranges this rank
owns. A tied head copy on the last pipeline stage reads the embedding's tensors (equal by design).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from lingshu_fast.model.checkpoint_io import SafetensorsSource, gather_full, read_local, tp_info
from lingshu_fast.model.shard_specs import ParamSpec, hf_tensor_shapes, param_specs, saved_specs
from lingshu_fast.parallel.relay import model_chunks

KINDS = ("model", "master", "exp_avg", "exp_avg_sq")
MOMENTS = ("exp_avg", "exp_avg_sq")


def _named_specs(model, specs_of: Callable) -> Iterator[tuple[str, torch.nn.Parameter, ParamSpec]]:
    for chunk in model_chunks(model):
        params = dict(chunk.named_parameters())
        for name, spec in specs_of(chunk).items():
            yield name, params[name], spec


def _bucket_state(optimizer, kind: str) -> Iterator[dict[int, torch.Tensor]]:
    """Per grad bucket: {id(param): its whole local (TP-shard) tensor of `kind`}, all-gathered over DP."""
    buffers = optimizer.buffers
    owned: dict[int, list] = {}
    for p, buf, lo, hi, main in optimizer.pieces:
        value = main if kind == "master" else optimizer.state[main][kind]
        owned.setdefault(id(buf), []).append((lo, hi, value))
    for b in buffers.buckets:
        whole = torch.zeros(b.end - b.start, dtype=torch.float32, device=b.buffer.grads.device)
        for lo, hi, value in owned.get(id(b.buffer), []):
            if b.start <= lo < b.end:
                whole[lo - b.start:hi - b.start].copy_(value)
        if buffers.shard:  # each rank filled its own shard: gather the others'
            lo, hi = b.shard(buffers.dp_rank, buffers.dp)
            mine = whole[lo - b.start:hi - b.start].clone()
            dist.all_gather(list(whole.chunk(buffers.dp)), mine, group=buffers.dp_group)
        yield {id(p): whole[b.buffer.offsets[id(p)] - b.start:][:p.numel()].view(p.shape) for p in b.params}


def collect_state(model, optimizer, *, stage_rank: int, stage_size: int) -> dict[str, dict[str, torch.Tensor]]:
    """This rank's share of the model's and optimizer's tensors, whole and HF-named, in host memory:
    {kind: {hf_name: tensor}}. Collective over all ranks (the TP and DP gathers). `stage_rank` /
    `stage_size`: this rank among its pipeline stage's TP x DP ranks (the writers)."""
    tp, _, tp_group = tp_info()
    full_shapes = hf_tensor_shapes(model.config)
    mine: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in KINDS}
    counter = [0]

    def keep(kind: str, local: torch.Tensor, spec: ParamSpec) -> None:
        tensors = gather_full(local, spec, full_shapes, tp, tp_group)  # collective over TP
        if counter[0] % stage_size == stage_rank:
            mine[kind].update(tensors)
        counter[0] += 1

    saved = {id(p) for _, p, _ in _named_specs(model, saved_specs)}
    for _, p, spec in _named_specs(model, saved_specs):
        keep("model", p.detach(), spec)
    specs = {id(p): spec for _, p, spec in _named_specs(model, param_specs)}
    kinds = (["master"] if optimizer.has_masters else []) + (list(MOMENTS) if optimizer.updates else [])
    for kind in kinds:
        for per_param in _bucket_state(optimizer, kind):
            for pid, local in per_param.items():
                if pid in saved:
                    keep(kind, local.to(torch.float32), specs[pid])
    return mine


def write_tensors(tensors: dict[str, dict[str, torch.Tensor]], folder: Path, rank: int) -> list[Path]:
    """Write `collect_state`'s result under `folder/<kind>/part-rank<rank>.safetensors` (no collectives)."""
    from safetensors.torch import save_file

    written = []
    for kind, named in tensors.items():
        if named:
            path = folder / kind / f"part-rank{rank:05d}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in named.items()}, str(path), metadata={"format": "pt"})
            written.append(path)
    return written


@torch.no_grad()
def read_state(model, optimizer, folder: Path, *, updates: int) -> None:
    """Load `folder` (written by `write_state` under any layout) into this rank's model and optimizer."""
    tp, tp_rank, _ = tp_info()
    sources = {kind: SafetensorsSource(str(folder / kind)) for kind in KINDS if (folder / kind).is_dir()}
    shapes = {kind: src.shapes() for kind, src in sources.items()}
    for _, p, spec in _named_specs(model, param_specs):
        p.copy_(read_local(spec, sources["model"], shapes["model"], tp, tp_rank).reshape(p.shape))
    specs = {id(p): spec for _, p, spec in _named_specs(model, param_specs)}
    cache: dict[tuple[str, int], torch.Tensor] = {}

    def local(kind: str, p) -> torch.Tensor:
        key = (kind, id(p))
        if key not in cache:
            cache.clear()  # one parameter's tensors at a time
            cache[key] = read_local(specs[id(p)], sources[kind], shapes[kind], tp, tp_rank).reshape(-1)
        return cache[key]

    optimizer.updates = updates
    for p, buf, lo, hi, main in optimizer.pieces:
        start = buf.offsets[id(p)]
        if "master" in sources:
            main.copy_(local("master", p)[lo - start:hi - start])
        elif main.data_ptr() != buf.params[lo:hi].data_ptr():
            main.copy_(buf.params[lo:hi])  # an fp32 checkpoint into a bf16 run: masters from the weights
        if updates and all(k in sources for k in MOMENTS):
            optimizer.state[main] = {"step": optimizer.step_tensor(main, updates),
                                     **{k: local(k, p)[lo - start:hi - start].clone().to(main.device)
                                        for k in MOMENTS}}
        else:
            optimizer.state.pop(main, None)
