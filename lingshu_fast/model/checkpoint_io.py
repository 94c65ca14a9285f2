"""Hugging Face safetensors in and out, sharded by the current TP/PP ranks.

Load (`from_pretrained`): config.json -> Qwen2_5_VLConfig; the checkpoint's tensor names and shapes
are checked against the config first (missing, unexpected and mis-shaped tensors are all listed in
one CheckpointError); then each parameter reads only this rank's rows/columns through
`safe_open(...).get_slice(name)` - no rank ever holds a full copy of a sharded weight.

Save (`save_pretrained`): every TP group with DP rank 0 all-gathers each parameter to its TP rank 0,
which writes its pipeline stage's tensors (HF names, HF layout) into safetensors files in a
temporary folder beside the target; global rank 0 then names the shards, writes
model.safetensors.index.json, config.json and generation_config.json (and what `extra_files` adds,
e.g. the tokenizer) and renames the folder into place (a crash leaves any previous export intact).
Multi-node saving needs a shared filesystem.

An export never deletes anything but a previous export (`export_folder.py`: the marker written
inside the folder before the rename, and which targets may be replaced); anything else is refused
(`ExportTargetError`) before a byte is written.

Random init (`build_model`) draws each full HF tensor from a generator seeded by (seed, name) and
slices it like a checkpoint, so a random model is identical under any TP/PP layout.
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import zlib
from typing import Callable, Optional

import torch
import torch.distributed as dist

from lingshu_fast.model.config import load_hf_config
from lingshu_fast.model.export_folder import (
    PARTIAL_MARKER,
    ExportTargetError,
    clean_leftovers,
    export_target_problem,
    free_space_problem,
    write_marker,
)
from lingshu_fast.model.qwen2_5_vl import Qwen25VLModel
from lingshu_fast.model.shard_specs import ParamSpec, canonical_name, hf_tensor_shapes, param_specs, saved_specs

INDEX_FILE = "model.safetensors.index.json"
_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}


class CheckpointError(ValueError):
    """A checkpoint folder does not match its config (names every offending tensor)."""


# ---------------- parallel context ----------------
def tp_info() -> tuple[int, int, object]:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        if os.environ.get("WORLD_SIZE", "1") != "1" or dist.is_initialized():
            raise RuntimeError("call lingshu_fast.parallel.state.init_parallel(tp, pp) before building the model")
        from lingshu_fast.parallel.state import init_parallel

        init_parallel(1, 1, backend="gloo")  # a lone process: world size 1
    return (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
            ps.get_tensor_model_parallel_group())


def resolve_dtype(dtype, device) -> torch.dtype:
    """torch dtype from a dtype or the config's strings: "auto" is bf16 on CUDA, fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    choices = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16}
    if dtype not in choices:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(choices)}")
    return choices[dtype]


# ---------------- tensor sources ----------------
class SafetensorsSource:
    def __init__(self, path: str):
        from safetensors import safe_open

        index_file = os.path.join(path, INDEX_FILE)
        if os.path.isfile(index_file):
            with open(index_file) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no safetensors files (model.safetensors or {INDEX_FILE})")
        self.handles, self.location = [], {}
        for file_name in files:
            handle = safe_open(os.path.join(path, file_name), framework="pt")
            self.handles.append(handle)
            for key in handle.keys():
                self.location[canonical_name(key)] = (handle, key)

    def shapes(self) -> dict[str, tuple]:
        return {name: tuple(h.get_slice(key).get_shape()) for name, (h, key) in self.location.items()}

    def slice(self, name: str):
        handle, key = self.location[name]
        return handle.get_slice(key)


class _RandomSource:
    """Full HF tensors drawn like transformers' init: norms 1, biases 0, weights N(0, std)."""

    def __init__(self, config, seed: int):
        self.config, self.seed, self.full_shapes = config, seed, hf_tensor_shapes(config)

    def slice(self, name: str) -> torch.Tensor:
        shape = self.full_shapes[name]
        if name.endswith(".bias"):
            return torch.zeros(shape)
        if "norm" in name or "ln_q" in name:
            return torch.ones(shape)
        std = (self.config.vision_config if name.startswith("visual.") else self.config.text_config).initializer_range
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.randn(shape, generator=gen) * std


def _check_checkpoint(path: str, config, found: dict[str, tuple]) -> None:
    expected = hf_tensor_shapes(config)
    missing = sorted(set(expected) - set(found))
    # a tied checkpoint may still carry lm_head.weight (a copy of the embedding): ignore it
    unexpected = sorted(n for n in set(found) - set(expected) if not (n == "lm_head.weight" and config.tie_word_embeddings))
    misshaped = sorted(f"{n}: file {found[n]} vs config {expected[n]}"
                       for n in set(expected) & set(found) if tuple(found[n]) != tuple(expected[n]))
    if missing or unexpected or misshaped:
        lines = [f"checkpoint {path} does not match its config.json:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise CheckpointError("\n".join(lines))


def read_local(spec: ParamSpec, source, full_shapes: dict, tp: int, rank: int) -> torch.Tensor:
    if spec.whole:
        tp, rank = 1, 0
    if spec.split is None:
        return source.slice(spec.pieces[0].hf_name)[:]
    if spec.split == 1:
        cols = full_shapes[spec.pieces[0].hf_name][1] // tp
        return source.slice(spec.pieces[0].hf_name)[:, rank * cols:(rank + 1) * cols]
    chunks = []
    for piece in spec.pieces:
        part_rows = full_shapes[piece.hf_name][0] // piece.parts
        local = part_rows // tp
        start = piece.part * part_rows + rank * local
        chunks.append(source.slice(piece.hf_name)[start:start + local])
    return torch.cat(chunks, dim=0)


def _fill(model: Qwen25VLModel, source, full_shapes: dict) -> None:
    tp, rank, _ = tp_info()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, spec in param_specs(model).items():
            local = read_local(spec, source, full_shapes, tp, rank)
            params[name].copy_(local.reshape(params[name].shape))


def _finish(model, device, activation_checkpointing, every_k: int) -> Qwen25VLModel:
    model.set_recompute(activation_checkpointing, every_k)
    return model.to(device)


def build_model(hf_config, *, seed: int = 0, dtype=torch.float32, device="cpu", layer_start: int = 0,
                layer_end=None, activation_checkpointing="none", checkpoint_every_k_layers: int = 1,
                attention_backend: str = "auto", sequence_parallel: bool = False) -> Qwen25VLModel:
    """A randomly initialised model for this rank (identical across TP/PP layouts for the same seed)."""
    tp, _, _ = tp_info()
    dtype = resolve_dtype(dtype, device)
    model = Qwen25VLModel(hf_config, dtype=dtype, tp=tp, layer_start=layer_start, layer_end=layer_end,
                          attention_backend=attention_backend, sequence_parallel=sequence_parallel)
    source = _RandomSource(hf_config, seed)
    _fill(model, source, source.full_shapes)
    return _finish(model, device, activation_checkpointing, checkpoint_every_k_layers)


def from_pretrained(path: str, *, dtype=torch.float32, device="cpu", activation_checkpointing="none",
                    checkpoint_every_k_layers: int = 1, layer_start: int = 0, layer_end=None,
                    attention_backend: str = "auto", sequence_parallel: bool = False) -> Qwen25VLModel:
    """This rank's TP shard (and PP layer range) of the HF Qwen2.5-VL folder `path`."""
    config = load_hf_config(path)
    source = SafetensorsSource(path)
    found = source.shapes()
    _check_checkpoint(path, config, found)
    tp, _, _ = tp_info()
    dtype = resolve_dtype(dtype, device)
    model = Qwen25VLModel(config, dtype=dtype, tp=tp, layer_start=layer_start, layer_end=layer_end,
                          attention_backend=attention_backend, sequence_parallel=sequence_parallel)
    _fill(model, source, found)
    return _finish(model, device, activation_checkpointing, checkpoint_every_k_layers)


# ---------------- save ----------------
def gather_full(param: torch.Tensor, spec: ParamSpec, full_shapes: dict, tp: int, group) -> dict[str, torch.Tensor]:
    """HF tensors (full, on CPU) for one parameter, all-gathered over TP on its own device (NCCL
    gathers only CUDA tensors)."""
    local = param.detach().contiguous()
    if spec.whole:
        tp = 1
    if spec.split is None:
        return {spec.pieces[0].hf_name: local.cpu().reshape(full_shapes[spec.pieces[0].hf_name])}
    if tp > 1:
        shards = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(shards, local, group=group)
        shards = [shard.cpu() for shard in shards]
    else:
        shards = [local.cpu()]
    if spec.split == 1:
        return {spec.pieces[0].hf_name: torch.cat(shards, dim=1)}
    by_name: dict[str, list] = {}
    offset = 0
    for piece in spec.pieces:
        local_rows = full_shapes[piece.hf_name][0] // piece.parts // tp
        by_name.setdefault(piece.hf_name, []).append(
            torch.cat([shard[offset:offset + local_rows] for shard in shards], dim=0))
        offset += local_rows
    return {name: torch.cat(parts, dim=0) for name, parts in by_name.items()}


def full_hf_state_dict(model: Qwen25VLModel, *, grads: bool = False) -> dict[str, torch.Tensor]:
    """This stage's parameters (or their gradients) as full HF-named tensors, gathered over TP.

    Every TP rank takes part and gets the full tensors (CPU). With `grads=True` a parameter
    without a gradient is left out. Useful to compare layouts and for exports.
    """
    tp, _, group = tp_info()
    full_shapes = hf_tensor_shapes(model.config)
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for name, spec in saved_specs(model).items():
        tensor = params[name].grad if grads else params[name]
        if tensor is None:
            continue
        out.update(gather_full(tensor, spec, full_shapes, tp, group))
    return out


def _write_shards(tensors: dict[str, torch.Tensor], folder: str, prefix: str, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    batch, size, k = {}, 0, 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if batch and size + nbytes > max_shard_bytes:
            save_file(batch, os.path.join(folder, f"{prefix}-{k:05d}.part"), metadata={"format": "pt"})
            batch, size, k = {}, 0, k + 1
        batch[name], size = tensors[name], size + nbytes
    if batch:
        save_file(batch, os.path.join(folder, f"{prefix}-{k:05d}.part"), metadata={"format": "pt"})


def _finalize(tmp: str, path: str, config, dtype, *, overwrite: bool,
              extra_files: Optional[Callable[[str], None]], nonce: str) -> None:
    from safetensors import safe_open
    from transformers import GenerationConfig

    parts = sorted(f for f in os.listdir(tmp) if f.endswith(".part"))
    weight_map, total = {}, 0
    for i, part in enumerate(parts):
        final = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        os.rename(os.path.join(tmp, part), os.path.join(tmp, final))
        with safe_open(os.path.join(tmp, final), framework="pt") as f:
            for key in f.keys():
                weight_map[key] = final
                tensor_slice = f.get_slice(key)
                total += torch.Size(tensor_slice.get_shape()).numel() * _DTYPE_BYTES[tensor_slice.get_dtype()]
    with open(os.path.join(tmp, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    config = config.__class__.from_dict(config.to_dict())
    config.dtype = dtype
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    config.save_pretrained(tmp)
    GenerationConfig.from_model_config(config).save_pretrained(tmp)
    if extra_files is not None:
        extra_files(tmp)
    os.remove(os.path.join(tmp, PARTIAL_MARKER))
    write_marker(tmp, os.listdir(tmp))
    problem = export_target_problem(path, overwrite=overwrite)  # again: the folder may have changed meanwhile
    if problem is not None:
        raise ExportTargetError(problem)
    old = f"{path}.old-{nonce}"
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _share(value):
    """Rank 0's `value` on every rank (a barrier too)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def _begin_export(path: str, *, overwrite: bool, need_bytes: int, rank: int = 0) -> tuple[str, str]:
    """Rank 0 checks the target (a previous export of ours or nothing) and the free space, then makes
    the temporary folder; every rank gets (temporary folder, nonce) or the same error."""
    problem, no_space, nonce = None, None, secrets.token_hex(4)
    if rank == 0:
        problem = export_target_problem(path, overwrite=overwrite)
        if problem is None:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            clean_leftovers(path)
            no_space = free_space_problem(os.path.dirname(path) or ".", need_bytes)
        if problem is None and no_space is None:
            os.makedirs(f"{path}.tmp-{nonce}")
            open(os.path.join(f"{path}.tmp-{nonce}", PARTIAL_MARKER), "w").close()
    problem, no_space, nonce = _share((problem, no_space, nonce))
    if problem is not None:
        raise ExportTargetError(problem)
    if no_space is not None:
        raise OSError(errno.ENOSPC, no_space, os.path.dirname(path) or ".")
    return f"{path}.tmp-{nonce}", nonce


def export_tensor_folder(source: str, path: str, config, dtype: torch.dtype, *, overwrite: bool = False,
                         extra_files: Optional[Callable[[str], None]] = None,
                         max_shard_bytes: int = 5 * 1024 ** 3) -> None:
    """One process: whole HF-named tensors in `source` (a checkpoint's `model/` folder, any layout)
    streamed into an HF folder at `path`, shard by shard (never the whole model in memory), published
    as `save_pretrained` publishes."""
    from safetensors.torch import save_file

    path = path.rstrip("/")
    tensors = SafetensorsSource(source)
    need = sum(torch.Size(shape).numel() for shape in tensors.shapes().values()) * dtype.itemsize
    tmp, nonce = _begin_export(path, overwrite=overwrite, need_bytes=need)
    try:
        batch, size, k = {}, 0, 0
        for name in sorted(tensors.location):
            tensor = tensors.slice(name)[:].to(dtype)
            if batch and size + tensor.numel() * tensor.element_size() > max_shard_bytes:
                save_file(batch, os.path.join(tmp, f"model-{k:05d}.part"), metadata={"format": "pt"})
                batch, size, k = {}, 0, k + 1
            batch[name], size = tensor, size + tensor.numel() * tensor.element_size()
        if batch:
            save_file(batch, os.path.join(tmp, f"model-{k:05d}.part"), metadata={"format": "pt"})
        _finalize(tmp, path, config, dtype, overwrite=overwrite, extra_files=extra_files, nonce=nonce)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed export must not keep the disk full
        raise


def save_pretrained(model, path: str, *, max_shard_bytes: int = 5 * 1024 ** 3, overwrite: bool = True,
                    extra_files: Optional[Callable[[str], None]] = None) -> None:
    """Write the whole model (all TP shards and PP stages) as an HF folder at `path`. Call on every rank.
    `model` is a Qwen25VLModel or a rank's pipeline chunks (`.chunks`, each a Qwen25VLModel).

    `path` must be missing, empty or a previous export of ours (replaced only with `overwrite`);
    anything else raises ExportTargetError on every rank before anything is written.
    `extra_files(folder)` (rank 0) adds files to the export before it is published (e.g. a
    tokenizer's `save_pretrained`), so they are part of it. Too little free space for the weights
    raises OSError(ENOSPC) on every rank, also before anything is written."""
    from megatron.core import parallel_state as ps

    path = path.rstrip("/")
    tp, tp_rank, group = tp_info()
    world_rank = dist.get_rank() if dist.is_initialized() else 0
    need = sum(torch.Size(s).numel() for s in hf_tensor_shapes(model.config).values()) * model.dtype.itemsize
    tmp, nonce = _begin_export(path, overwrite=overwrite, need_bytes=need, rank=world_rank)
    if ps.get_data_parallel_rank() == 0:
        stage = ps.get_pipeline_model_parallel_rank()
        # several chunks per rank under the interleaved pipeline schedule: one file prefix per chunk
        for chunk in getattr(model, "chunks", [model]):
            tensors = full_hf_state_dict(chunk)
            if tp_rank == 0:
                _write_shards(tensors, tmp, f"stage{stage:03d}-layer{chunk.layer_start:04d}", max_shard_bytes)
    if dist.is_initialized():
        dist.barrier()
    error = None
    if world_rank == 0:
        try:
            _finalize(tmp, path, model.config, model.dtype, overwrite=overwrite, extra_files=extra_files, nonce=nonce)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed export must not keep the disk full
            if not dist.is_initialized() or dist.get_world_size() == 1:
                raise
            error = err if isinstance(err, ExportTargetError) else f"{type(err).__name__}: {err}"
    error = _share(error)
    if isinstance(error, ExportTargetError):
        raise error
    if error is not None:
        raise RuntimeError(f"exporting to {path} failed on rank 0: {error}")
