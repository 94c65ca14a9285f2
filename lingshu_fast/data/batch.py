"""`MicroBatch`: one packed micro-batch, as the model and the loss consume it.

Conventions (the trainer relies on them):
- Samples are concatenated on one token axis (no batch dimension): `input_ids [T]`; sample b owns
  tokens `cu_seqlens[b]:cu_seqlens[b+1]` and attends only inside that range (varlen attention).
- `labels` are ALREADY SHIFTED for next-token prediction, per sample: `labels[i]` is the target of the
  hidden state at position i (the next token of the same sample), -100 where nothing is trained and at
  each sample's last position (so no target ever crosses into the next sample). The loss is a plain
  cross-entropy of `hidden_states[i] @ W_vocab` against `labels[i]`; do not shift again.
- `num_label_tokens` counts `labels != -100`: the figure the loss normalisation sums over the step.
- `position_ids [3, T]` are Qwen2.5-VL's M-RoPE ids (temporal, height, width), each sample from 0.
- `pixel_values [P, 1176]` and `image_grid_thw [n, 3]` hold every image of every sample in token
  order; `vit_cu_seqlens [n+1]` (int32) are the cumulative patches per image (t*h*w), the ViT's
  per-image attention boundaries.
- Or, with `data.image_transfer=uint8`, the images are still bytes: `image_uint8 [sum h*w*3]` (the
  smart-resized images, HWC, concatenated) with `image_sizes [n, 2]`, and `pixel_values` is None.
  `to(device)` moves the bytes and packs them there (`kernels.image_pack.pack_images`: Triton on
  CUDA), so only uint8 crosses the host-to-device link: 1 byte per pixel and channel instead of the
  8 of float32 patches (two temporal copies of 4 bytes). What the model sees is identical.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch

IGNORE_INDEX = -100


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [T] int64
    labels: torch.Tensor  # [T] int64, shifted per sample (see module docstring)
    position_ids: torch.Tensor  # [3, T] int64
    cu_seqlens: torch.Tensor  # [B+1] int32
    max_seqlen: int
    pixel_values: Optional[torch.Tensor] = None  # [P, 1176] float32
    image_grid_thw: Optional[torch.Tensor] = None  # [n, 3] int64
    vit_cu_seqlens: Optional[torch.Tensor] = None  # [n+1] int32
    image_uint8: Optional[torch.Tensor] = None  # [sum h*w*3] uint8, resized images not yet packed
    image_sizes: Optional[torch.Tensor] = None  # [n, 2] int64 (h, w) of each resized image
    num_label_tokens: int = 0
    sample_ids: list[int] = field(default_factory=list)  # dataset indices, in segment order
    num_samples: int = 0  # real samples (pad segments from pad_to are not counted)

    @classmethod
    def from_arrays(cls, arrays: dict) -> "MicroBatch":
        """A MicroBatch over the numpy arrays of `builder.BatchBuilder.build` (no copy)."""
        def tensor(name):
            value = arrays.get(name)
            return None if value is None else torch.from_numpy(value)

        return cls(input_ids=tensor("input_ids"), labels=tensor("labels"), position_ids=tensor("position_ids"),
                   cu_seqlens=tensor("cu_seqlens"), max_seqlen=int(arrays["max_seqlen"]),
                   pixel_values=tensor("pixel_values"), image_grid_thw=tensor("image_grid_thw"),
                   vit_cu_seqlens=tensor("vit_cu_seqlens"), image_uint8=tensor("image_uint8"),
                   image_sizes=tensor("image_sizes"), num_label_tokens=int(arrays["num_label_tokens"]),
                   sample_ids=list(arrays["sample_ids"]), num_samples=len(arrays["sample_ids"]))

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def segment_lengths(self) -> list[int]:
        """Token counts of the non-empty segments (pad_to's empty slots left out): what FLOPs count."""
        return [n for n in (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist() if n > 0]

    @property
    def num_images(self) -> int:
        return 0 if self.image_grid_thw is None else int(self.image_grid_thw.shape[0])

    def _map_tensors(self, fn) -> "MicroBatch":
        changes = {f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **changes)

    def to(self, device, non_blocking: bool = True, *, pixel_dtype: torch.dtype = torch.float32) -> "MicroBatch":
        """The batch on `device`, images packed there if they came as bytes (see the docstring), as
        `pixel_dtype` (the model's dtype: the kernel rounds once, what a later cast would give)."""
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking)).pack_pixels(pixel_dtype)

    def pack_pixels(self, pixel_dtype: torch.dtype = torch.float32) -> "MicroBatch":
        """`image_uint8` -> `pixel_values` (`pixel_dtype`) on the bytes' device; a no-op without bytes."""
        if self.image_uint8 is None:
            return self
        from lingshu_fast.kernels.image_pack import pack_images

        pixel_values, grid = pack_images(self.image_uint8, self.image_sizes, out_dtype=pixel_dtype)
        if self.image_grid_thw is not None and not torch.equal(grid.cpu(), self.image_grid_thw.cpu()):
            raise ValueError(f"packed image grids {grid.tolist()} differ from the batch's image_grid_thw "
                             f"{self.image_grid_thw.tolist()}")
        return dataclasses.replace(self, pixel_values=pixel_values, image_uint8=None, image_sizes=None)

    def pin_memory(self) -> "MicroBatch":
        if not torch.cuda.is_available():  # pinning needs a CUDA driver; a no-op on CPU-only hosts
            return self
        return self._map_tensors(lambda t: t.pin_memory())

    def pad_to(self, total_tokens: int, max_segments: int, *, pad_token_id: int = 0) -> "MicroBatch":
        """A copy with a fixed shape for pipeline parallelism, whose stage buffers cannot change size:
        the tail `total_tokens - T` tokens become their own segment (labels -100, positions 0..n-1),
        and `cu_seqlens` is padded to `max_segments + 1` entries by repeating its last value (empty
        segments, which varlen attention skips). `max_segments` counts the pad segment too."""
        T = self.num_tokens
        segments = int(self.cu_seqlens.numel()) - 1
        pad_len = total_tokens - T
        if pad_len < 0:
            raise ValueError(f"micro-batch has {T} tokens, more than pad_to's total_tokens={total_tokens}")
        needed = segments + (1 if pad_len > 0 else 0)
        if needed > max_segments:
            raise ValueError(f"micro-batch needs {needed} segments (with the pad segment), more than "
                             f"max_segments={max_segments}; raise it")
        input_ids, labels, position_ids, cu = self.input_ids, self.labels, self.position_ids, self.cu_seqlens
        max_seqlen = self.max_seqlen
        if pad_len > 0:
            input_ids = torch.cat([input_ids, input_ids.new_full((pad_len,), pad_token_id)])
            labels = torch.cat([labels, labels.new_full((pad_len,), IGNORE_INDEX)])
            pad_pos = torch.arange(pad_len, dtype=position_ids.dtype, device=position_ids.device)
            position_ids = torch.cat([position_ids, pad_pos.expand(3, pad_len)], dim=1)
            cu = torch.cat([cu, cu.new_tensor([total_tokens])])
            max_seqlen = max(max_seqlen, pad_len)
        fill = max_segments + 1 - cu.numel()
        if fill > 0:
            cu = torch.cat([cu, cu[-1:].expand(fill)])
        return dataclasses.replace(self, input_ids=input_ids, labels=labels, position_ids=position_ids,
                                   cu_seqlens=cu, max_seqlen=int(max_seqlen))


def shift_labels(labels, cu_seqlens):
    """Unshifted per-token labels -> next-token targets, never crossing a segment boundary (numpy or
    torch, 1-D). `out[i] = labels[i+1]` inside a segment, -100 at each segment's last token."""
    out = labels.copy() if hasattr(labels, "copy") and not isinstance(labels, torch.Tensor) else labels.clone()
    out[:-1] = labels[1:]
    if len(out):
        ends = cu_seqlens[1:] - 1
        out[ends[ends >= 0]] = IGNORE_INDEX
    return out
