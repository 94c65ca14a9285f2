"""`PackedLoader`: JSONL / records -> packed `MicroBatch`es, sharded by data-parallel rank, resumable.

Start-up (once): every record is parsed and validated (formats.py), every image's header is read for
its size (a full decode too under data.strict=true), token counts per image follow from `smart_resize`
of that size (t*h*w/4 of the grid), and each sample is rendered and tokenised ONCE; the ids and the
trained-token mask are cached (int32 + bool, 5 bytes a token). Samples longer than the limit
(data.max_length, and data.max_tokens_per_microbatch when packing) are skipped as too_long.
Under data.strict=true every problem of the whole data set is collected and raised as one DataError
naming file:line and reason; otherwise each is logged and counted in `skipped`.

Each epoch e is planned from the cached lengths alone: `plan_packing(lengths, budget, window, seed_e)`
(or a seeded permutation, one sample a micro-batch, when data.pack=false), seed_e derived from
(seed, e). Every rank computes the same plan and takes bins r, r+dp, r+2dp, ... up to
floor(bins/dp) each, so ranks stay in lockstep and, with the trainer taking global_microbatches/dp
micro-batches per rank per step, step k always consumes global bins [k*G, (k+1)*G) whatever dp is.

Images are decoded and resized only when a micro-batch is built; they are normalised and patchified
there too (`pixel_values`), or, under `data.image_transfer=uint8` (auto: on CUDA), left as bytes
that `MicroBatch.to(device)` packs on the device (batch.py). An image that fails to decode
then (corrupt data the header read could not see) drops its sample from the micro-batch, counted as
corrupt_image in `skipped_runtime` (a DataError under strict). A micro-batch never disappears, so the
ranks stay in lockstep; if all its samples fail it becomes one pad token with no labels.

`state_dict()` is (epoch, position in this rank's bins, seed, a fingerprint of the data); a loader
built on the same data with `load_state_dict(state)` yields exactly the next micro-batch. Resuming
with another dp size works when the global position divides by the new size.
"""
from __future__ import annotations

import collections
import logging
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from lingshu_fast.data import images as img
from lingshu_fast.data.batch import IGNORE_INDEX, MicroBatch, shift_labels
from lingshu_fast.data.formats import DataError, Sample, SampleError, SkipLog, SkipReason, load_records
from lingshu_fast.data.packing import plan_packing
from lingshu_fast.data.rope import sample_position_ids
from lingshu_fast.data.template import ChatTemplate, TemplateError

logger = logging.getLogger(__name__)

MERGE_SIZE = 2  # Qwen2.5-VL's spatial merge: one LLM token per 2x2 patches


def _looks_like_dicom(path: str) -> bool:
    """A .dcm/.dicom name, or the 'DICM' magic after the 128-byte preamble (extensionless files)."""
    if Path(path).suffix.lower() in img.DICOM_SUFFIXES:
        return True
    with open(path, "rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def image_hw(path: str) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels; SampleError(corrupt_image)
    when the file is not a readable image."""
    try:
        if _looks_like_dicom(path):
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return int(ds.Rows), int(ds.Columns)
        import PIL.Image

        with PIL.Image.open(path) as im:
            width, height = im.size
        return int(height), int(width)
    except Exception as err:  # noqa: BLE001 - PIL/pydicom raise many types for a bad file
        raise SampleError(SkipReason.CORRUPT_IMAGE,
                          f"cannot read image header of {path} ({type(err).__name__}: {err})") from None


def image_grid(height: int, width: int, *, min_pixels: int, max_pixels: int) -> tuple[int, int, int]:
    """(t, h, w) patch grid of one image after smart_resize, exactly as preprocess will give it."""
    rh, rw = img.smart_resize(height, width, img.FACTOR, min_pixels, max_pixels)
    return 1, rh // img.PATCH_SIZE, rw // img.PATCH_SIZE


def _seed_for_epoch(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, dtype=np.uint32)[0])


class PackedLoader:
    """Iterator of MicroBatch for one data-parallel rank; see the module docstring."""

    def __init__(self, sources: Sequence, tokenizer, cfg, *, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, epochs: Optional[int] = None):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must lie in [0, dp_size={dp_size})")
        self.cfg, self.dp_rank, self.dp_size, self.seed, self.epochs = cfg, dp_rank, dp_size, seed, epochs
        # images as bytes, packed on the device by MicroBatch.to (data.image_transfer)
        self._ship_uint8 = cfg.image_transfer == "uint8" or (cfg.image_transfer == "auto" and torch.cuda.is_available())
        self.template = ChatTemplate(tokenizer, cfg.system_prompt)
        self.token_ids = self.template.ids
        self.limit = min(cfg.max_length, cfg.max_tokens_per_microbatch) if cfg.pack else cfg.max_length
        self._startup = SkipLog(strict=cfg.strict)
        self._runtime = {r.value: 0 for r in SkipReason}
        self._scan(load_records(sources, image_root=cfg.image_root, skips=self._startup))
        self._startup.raise_if_strict()
        if not self.samples:
            raise DataError(f"no usable training samples in {list(map(str, sources))[:4]} "
                            f"(skipped: { {k: v for k, v in self._startup.counts.items() if v} })")
        self.fingerprint = zlib.crc32(self.lengths.tobytes()) ^ len(self.lengths)
        self.epoch, self.position = 0, 0
        self._plans: dict[int, list[np.ndarray]] = {}  # this rank's bins of the current and next epoch
        self._pool = None
        self._pending: collections.deque = collections.deque()
        self._ahead = iter(())
        self._bins_for(0)  # too few micro-batches for dp_size is a start-up error, not a first-step one

    # -- start-up -------------------------------------------------------------------------------
    def _scan(self, records: list[Sample], chunk: int = 512) -> None:
        self.samples: list[Sample] = []
        self._ids: list[np.ndarray] = []
        self._trained: list[np.ndarray] = []
        self._grids: list[np.ndarray] = []
        self._image_sizes: dict[str, tuple[int, int]] = {}  # many records share an image: read it once
        lengths = []
        for lo in range(0, len(records), chunk):
            ready = []
            for sample in records[lo:lo + chunk]:
                try:
                    ready.append((sample, self._grids_of(sample)))
                except SampleError as err:
                    self._startup.add(sample.source, err)
            rendered = self.template.render_many(
                [(s.messages, [int(t * h * w) // MERGE_SIZE**2 for t, h, w in g]) for s, g in ready])
            for (sample, grid), result in zip(ready, rendered):
                if isinstance(result, TemplateError):
                    self._startup.add(sample.source, SampleError(SkipReason.BAD_SCHEMA, str(result)))
                    continue
                ids, labels = result
                if len(ids) > self.limit:
                    self._startup.add(sample.source, SampleError(
                        SkipReason.TOO_LONG, f"{len(ids)} tokens > {self.limit} (data.max_length="
                        f"{self.cfg.max_length}, data.max_tokens_per_microbatch="
                        f"{self.cfg.max_tokens_per_microbatch}, data.pack={self.cfg.pack})"))
                    continue
                self.samples.append(sample)
                self._ids.append(ids.astype(np.int32))
                self._trained.append(labels != IGNORE_INDEX)
                self._grids.append(grid)
                lengths.append(len(ids))
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self._image_sizes.clear()

    def _grids_of(self, sample: Sample) -> np.ndarray:
        grids = []
        for path in sample.images:
            if self.cfg.strict:  # a full decode: catches truncated files the header read cannot
                try:
                    height, width = img.load_image(path).shape[:2]
                except img.ImageError as err:
                    raise SampleError(SkipReason.CORRUPT_IMAGE, str(err)) from None
            else:
                if path not in self._image_sizes:
                    self._image_sizes[path] = image_hw(path)
                height, width = self._image_sizes[path]
            try:
                grids.append(image_grid(height, width, min_pixels=self.cfg.min_pixels,
                                        max_pixels=self.cfg.max_pixels))
            except img.ImageError as err:  # e.g. an aspect ratio over 200
                raise SampleError(SkipReason.CORRUPT_IMAGE, str(err)) from None
        return np.asarray(grids, dtype=np.int64).reshape(-1, 3)

    # -- planning -------------------------------------------------------------------------------
    def _global_bins(self, epoch: int) -> list[np.ndarray]:
        seed = _seed_for_epoch(self.seed, epoch)
        if not self.cfg.pack:
            order = np.random.Generator(np.random.PCG64(seed)).permutation(len(self.lengths))
            return [order[i:i + 1] for i in range(len(order))]
        plan = plan_packing(self.lengths, self.cfg.max_tokens_per_microbatch,
                            window=self.cfg.shuffle_window, seed=seed)
        assert len(plan.oversize) == 0, "too_long samples were filtered at start-up"
        return plan.bins()

    def _bins_for(self, epoch: int) -> list[np.ndarray]:
        if epoch not in self._plans:
            bins = self._global_bins(epoch)
            per_rank = len(bins) // self.dp_size
            if per_rank == 0:
                raise DataError(f"only {len(bins)} micro-batches per epoch for {self.dp_size} data-parallel "
                                f"ranks: add data or lower data.max_tokens_per_microbatch")
            for old in [e for e in self._plans if e < epoch - 1 or e > epoch + 1]:
                del self._plans[old]
            self._plans[epoch] = bins[self.dp_rank::self.dp_size][:per_rank]
        return self._plans[epoch]

    def __len__(self) -> int:
        """Micro-batches per epoch on this rank (epoch 0's plan; later epochs differ by a few)."""
        return len(self._bins_for(self.epoch))

    def microbatches_in_epoch(self, epoch: int) -> int:
        return len(self._bins_for(epoch))

    def packing_efficiency(self, epoch: int = 0) -> float:
        """Real tokens / (micro-batches * budget) over all ranks' bins of `epoch` (1.0 = no padding)."""
        bins = self._global_bins(epoch)
        budget = self.cfg.max_tokens_per_microbatch if self.cfg.pack else self.cfg.max_length
        return float(sum(int(self.lengths[b].sum()) for b in bins)) / (len(bins) * budget)

    # -- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> "PackedLoader":
        return self

    def _coordinates(self, epoch: int, position: int):
        """(epoch, position) of the micro-batches from here on, crossing epochs; stops at `epochs`."""
        while True:
            while position >= len(self._bins_for(epoch)):
                if self.epochs is not None and epoch + 1 >= self.epochs:
                    return
                epoch, position = epoch + 1, 0
            yield epoch, position
            position += 1

    def __next__(self) -> MicroBatch:
        if self.cfg.num_workers <= 0:
            coord = next(self._coordinates(self.epoch, self.position), None)
            if coord is None:
                raise StopIteration
            batch, failed = self._build(self._bins_for(coord[0])[coord[1]])
        else:
            coord, batch, failed = self._next_prefetched()
        self._runtime[SkipReason.CORRUPT_IMAGE.value] += failed
        self.epoch, self.position = coord[0], coord[1] + 1
        return batch

    def _next_prefetched(self):
        """Keep 2*num_workers micro-batches building in threads (image decode and resize release the
        GIL); results are taken strictly in order, so the stream equals the unthreaded one."""
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.cfg.num_workers, thread_name_prefix="lingshu-data")
        if not self._pending:
            self._ahead = self._coordinates(self.epoch, self.position)
        while len(self._pending) < 2 * self.cfg.num_workers:
            coord = next(self._ahead, None)
            if coord is None:
                break
            self._pending.append((coord, self._pool.submit(self._build, self._bins_for(coord[0])[coord[1]])))
        if not self._pending:
            raise StopIteration
        coord, future = self._pending.popleft()
        return (coord, *future.result())

    def build(self, sample_ids: Sequence[int]) -> MicroBatch:
        """The MicroBatch of these dataset indices (images decoded and preprocessed here)."""
        batch, failed = self._build(sample_ids)
        self._runtime[SkipReason.CORRUPT_IMAGE.value] += failed
        return batch

    def _build(self, sample_ids: Sequence[int]) -> tuple[MicroBatch, int]:
        kept, loaded = [], []
        for index in map(int, sample_ids):
            sample = self.samples[index]
            try:
                arrays = [img.load_image(p) for p in sample.images]
            except img.ImageError as err:
                if self.cfg.strict:
                    raise DataError(f"{sample.source}: corrupt_image: {err}") from err
                logger.warning("skipping sample %s: corrupt_image: %s", sample.source, err)
                continue
            kept.append(index)
            loaded.extend(arrays)
        failed = len(sample_ids) - len(kept)
        if not kept:
            return self._empty_batch(), failed
        ids = [self._ids[i].astype(np.int64) for i in kept]
        lengths = np.asarray([len(x) for x in ids], dtype=np.int64)
        cu = np.concatenate([[0], np.cumsum(lengths)])
        input_ids = np.concatenate(ids)
        labels = np.where(np.concatenate([self._trained[i] for i in kept]), input_ids, IGNORE_INDEX)
        labels = shift_labels(labels, cu)
        grids = [self._grids[i] for i in kept]
        position_ids = np.concatenate([
            sample_position_ids(x, g if len(g) else None, image_token_id=self.token_ids["image_token_id"],
                                vision_start_token_id=self.token_ids["vision_start_token_id"],
                                spatial_merge_size=MERGE_SIZE) for x, g in zip(ids, grids)], axis=1)
        batch = MicroBatch(
            input_ids=torch.from_numpy(input_ids), labels=torch.from_numpy(labels.astype(np.int64)),
            position_ids=torch.from_numpy(np.ascontiguousarray(position_ids, dtype=np.int64)),
            cu_seqlens=torch.from_numpy(cu.astype(np.int32)), max_seqlen=int(lengths.max()),
            num_label_tokens=int((labels != IGNORE_INDEX).sum()), sample_ids=kept, num_samples=len(kept))
        if loaded:
            from lingshu_fast.kernels.image_pack import grid_of_sizes, pack_images

            resized = img.resize_images(loaded, min_pixels=self.cfg.min_pixels, max_pixels=self.cfg.max_pixels)
            flat_uint8, sizes = img.concat_uint8(resized)
            grid_thw = grid_of_sizes(sizes)
            expected = np.concatenate(grids)
            if not np.array_equal(grid_thw.numpy(), expected):  # header size != decoded size
                raise DataError(f"image grids {grid_thw.tolist()} differ from the start-up scan {expected.tolist()} "
                                f"for samples {[self.samples[i].source for i in kept]}: an image changed on disk?")
            patches = grid_thw.prod(dim=1)
            if self._ship_uint8:  # packed on the device by MicroBatch.to
                batch.image_uint8, batch.image_sizes = flat_uint8, sizes
            else:
                batch.pixel_values = pack_images(flat_uint8, sizes, out_dtype=torch.float32)[0]
            batch.image_grid_thw = grid_thw
            batch.vit_cu_seqlens = torch.cat([patches.new_zeros(1), patches.cumsum(0)]).to(torch.int32)
        return batch, failed

    def _empty_batch(self) -> MicroBatch:
        pad = self.token_ids["pad_token_id"]
        return MicroBatch(input_ids=torch.tensor([pad], dtype=torch.int64),
                          labels=torch.tensor([IGNORE_INDEX], dtype=torch.int64),
                          position_ids=torch.zeros(3, 1, dtype=torch.int64),
                          cu_seqlens=torch.tensor([0, 1], dtype=torch.int32), max_seqlen=1)

    def _drop_prefetched(self) -> None:
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()

    def close(self) -> None:
        """Stop the prefetch threads (also safe to leave to garbage collection)."""
        self._drop_prefetched()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    # -- metrics and resume ---------------------------------------------------------------------
    @property
    def skipped_startup(self) -> dict[str, int]:
        """Records dropped at start-up: the same on every rank (report once, do not all-reduce)."""
        return dict(self._startup.counts)

    @property
    def skipped_runtime(self) -> dict[str, int]:
        """Samples this rank dropped while building micro-batches (sum these over ranks)."""
        return dict(self._runtime)

    @property
    def skipped(self) -> dict[str, int]:
        return {k: self._startup.counts[k] + self._runtime[k] for k in self._runtime}

    def state_dict(self) -> dict:
        return {"version": 1, "epoch": self.epoch, "position": self.position,
                "global_position": self.position * self.dp_size, "dp_size": self.dp_size,
                "seed": self.seed, "fingerprint": self.fingerprint, "num_samples": len(self.lengths),
                "skipped_runtime": dict(self._runtime)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != 1:
            raise DataError(f"unknown data-loader state version {state.get('version')!r}")
        if state["seed"] != self.seed or state["fingerprint"] != self.fingerprint:
            raise DataError(f"cannot resume the data loader: the checkpoint was made with seed={state['seed']} on "
                            f"{state['num_samples']} samples, this run has seed={self.seed} on {len(self.lengths)} "
                            f"samples (different data, tokenizer or data.* settings); the exact next sample is "
                            f"unknown")
        position = state["position"]
        if state["dp_size"] != self.dp_size:
            if state["global_position"] % self.dp_size:
                raise DataError(f"cannot resume with dp={self.dp_size}: {state['global_position']} micro-batches "
                                f"were consumed in this epoch, not a multiple of {self.dp_size}")
            position = state["global_position"] // self.dp_size
        self._drop_prefetched()
        self.epoch, self.position = int(state["epoch"]), int(position)
        self._runtime.update(state.get("skipped_runtime", {}))
