"""Micro-batch building: sample ids -> the arrays of one packed micro-batch (runs in data workers).

`BatchBuilder.build(ids)` reads each sample's record (dataset.Part.read_sample), decodes its images,
renders and tokenises the kept samples in one batched call, checks every length against the index
(the packer planned with those: a mismatch means the data or tokenizer changed), and returns plain
numpy arrays (`MicroBatch.from_arrays` wraps them without a copy): no shared memory between
processes, so a small /dev/shm never matters. Images are smart-resized here and either shipped as
uint8 bytes (packed on the device: batch.py) or packed into float32 `pixel_values` here.

A sample whose record or images fail now (a truncated image the header read could not see, a
file gone since indexing) is dropped from its micro-batch and reported as (sample id, source,
reason, message); a micro-batch that loses every sample becomes one pad token without labels, so
ranks stay in lockstep. `BuildSpec` pickles to the workers once: parts as paths, the tokenizer as
its JSON (workers rebuild a bare `tokenizers.Tokenizer`; transformers is not needed there).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from lingshu_fast.data import images as img
from lingshu_fast.data.batch import IGNORE_INDEX, shift_labels
from lingshu_fast.data.dataset import Part, image_grids, record_length
from lingshu_fast.data.formats import DataError, SampleError, SkipReason
from lingshu_fast.data.rope import sample_position_ids
from lingshu_fast.data.template import ChatTemplate, TemplateError
from lingshu_fast.kernels.vision_geometry import MERGE_SIZE, PATCH_SIZE, image_tokens

logger = logging.getLogger(__name__)


@dataclass
class BuildSpec:
    parts: list  # dataset.Part, in record-id order
    part_starts: np.ndarray  # int64 [parts + 1]: first record id of each part
    tokenizer_json: str
    token_ids: dict
    system_prompt: str
    min_pixels: int
    max_pixels: int
    ship_uint8: bool


class BatchBuilder:
    def __init__(self, spec: BuildSpec, template: Optional[ChatTemplate] = None):
        self.spec = spec
        if template is None:
            from tokenizers import Tokenizer

            template = ChatTemplate(Tokenizer.from_str(spec.tokenizer_json), spec.system_prompt, ids=spec.token_ids)
        self.template = template
        self.ids = spec.token_ids

    def locate(self, record: int) -> tuple[Part, int]:
        p = int(np.searchsorted(self.spec.part_starts, record, side="right")) - 1
        return self.spec.parts[p], record - int(self.spec.part_starts[p])

    def build(self, sample_ids: Sequence[int], record_ids: Sequence[int]
              ) -> tuple[dict, list[tuple[int, str, str, str]]]:
        """(arrays of the micro-batch, failures [(sample id, source, reason, message)]) of the
        samples `sample_ids`, whose records (ids over all parts) are `record_ids`."""
        spec = self.spec
        kept, items, loaded, failures = [], [], [], []
        for sid, record in zip(map(int, sample_ids), map(int, record_ids)):
            part, k = self.locate(record)
            try:
                sample = part.read_sample(k)
                grids = image_grids(part, k, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
                if len(grids) != len(sample.images):
                    raise SampleError(SkipReason.IMAGE_COUNT_MISMATCH, "the record changed after indexing")
                arrays = img.resize_images(sample.images, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
            except img.ImageError as err:
                failures.append((sid, part.source(k), SkipReason.CORRUPT_IMAGE.value, str(err)))
                continue
            except SampleError as err:
                failures.append((sid, part.source(k), err.reason.value, str(err)))
                continue
            expected = record_length(part, k, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
            kept.append((sid, expected, grids, part.source(k)))
            items.append((sample.messages, [image_tokens(t, h, w) for t, h, w in grids]))
            loaded.extend(arrays)
        if not kept:
            return self.empty(), failures
        rendered = self.template.render_many(items)
        ids, trained = [], []
        for (sid, expected, _, source), result in zip(kept, rendered):
            if isinstance(result, TemplateError):
                raise DataError(f"{source}: {result} (it rendered when indexed: the data changed; delete its index)")
            if len(result[0]) != expected:
                raise DataError(f"{source}: {len(result[0])} tokens now, {expected} in the index: the data, tokenizer "
                                f"or image files changed since indexing; delete the index to rebuild it")
            ids.append(result[0])
            trained.append(result[1] != IGNORE_INDEX)
        out = self._text_arrays(ids, trained, [g for _, _, g, _ in kept])
        out["sample_ids"] = [sid for sid, *_ in kept]
        if loaded:
            out.update(self._image_arrays(loaded, np.concatenate([g for _, _, g, _ in kept])))
        return out, failures

    def _text_arrays(self, ids: list, trained: list, grids: list) -> dict:
        lengths = np.asarray([len(x) for x in ids], dtype=np.int64)
        cu = np.concatenate([[0], np.cumsum(lengths)])
        input_ids = np.concatenate(ids).astype(np.int64)
        labels = shift_labels(np.where(np.concatenate(trained), input_ids, IGNORE_INDEX), cu).astype(np.int64)
        position_ids = np.concatenate([
            sample_position_ids(x, g if len(g) else None, image_token_id=self.ids["image_token_id"],
                                vision_start_token_id=self.ids["vision_start_token_id"],
                                spatial_merge_size=MERGE_SIZE) for x, g in zip(ids, grids)], axis=1)
        return {"input_ids": input_ids, "labels": labels, "position_ids": np.ascontiguousarray(position_ids, np.int64),
                "cu_seqlens": cu.astype(np.int32), "max_seqlen": int(lengths.max()),
                "num_label_tokens": int((labels != IGNORE_INDEX).sum())}

    def _image_arrays(self, loaded: list, expected_grids: np.ndarray) -> dict:
        """`loaded`: the kept samples' images, already decoded and smart-resized (uint8 HWC)."""
        resized = loaded
        sizes = np.asarray([r.shape[:2] for r in resized], dtype=np.int64)
        grid = np.stack([np.ones(len(sizes), np.int64), sizes[:, 0] // PATCH_SIZE,
                         sizes[:, 1] // PATCH_SIZE], axis=1)
        if not np.array_equal(grid, expected_grids):  # header size != decoded size
            raise DataError(f"image grids {grid.tolist()} differ from the index's {expected_grids.tolist()}: "
                            f"an image changed on disk? delete the index to rebuild it")
        patches = grid.prod(axis=1)
        out = {"image_grid_thw": grid, "vit_cu_seqlens": np.concatenate([[0], np.cumsum(patches)]).astype(np.int32)}
        flat = np.concatenate([r.reshape(-1) for r in resized])
        if self.spec.ship_uint8:
            out.update(image_uint8=flat, image_sizes=sizes)
        else:
            out["pixel_values"] = img.pack_host(flat, sizes)
        return out

    def empty(self) -> dict:
        pad = self.ids["pad_token_id"]
        return {"input_ids": np.asarray([pad], np.int64), "labels": np.asarray([IGNORE_INDEX], np.int64),
                "position_ids": np.zeros((3, 1), np.int64), "cu_seqlens": np.asarray([0, 1], np.int32),
                "max_seqlen": 1, "num_label_tokens": 0, "sample_ids": []}
