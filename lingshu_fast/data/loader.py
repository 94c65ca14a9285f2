"""`PackedLoader`: indexed JSONL / records -> packed `MicroBatch`es for one data-parallel rank, resumable.

Start-up reads no record: each JSONL file's index (index.py: built once by one process, then
memory-mapped by every rank) gives every usable record's text tokens and image sizes; lengths for
this run follow by smart_resize (dataset.sample_lengths). Records longer than the limit
(data.max_length, and data.max_tokens_per_microbatch when packing) are too_long. Bad records the
index found and the too-long ones are counted once at start-up (`skipped_startup`, equal on every
rank) and logged (the first 20, then a summary); under data.strict=true all of them are ONE
DataError naming file:line and reason (and the index is built with every image decoded). A data
file without a single usable sample is an error too: it is almost always a wrong path or root.

Each epoch e is planned from the lengths alone: `plan_packing(lengths, budget, window, seed_e)` (or
a seeded permutation, one sample a micro-batch, when data.pack=false), seed_e derived from (seed,
e): every epoch has its own order. Every rank computes the same plan and takes global bins r,
r+dp, ... up to floor(bins/dp) each, so ranks stay in lockstep and step k consumes global bins
[k*G, (k+1)*G) whatever dp is. `epochs` (train.epochs) ends the stream; None cycles for ever.

Only this rank's micro-batches are read, rendered and tokenised, by `data.num_workers` worker
processes (workers.py; 0 builds in this process) that run ahead of the trainer, results taken
strictly in order so the stream never depends on the worker count. With `device` (CUDA), each
micro-batch is copied through pinned memory on a side stream one micro-batch ahead. `take_step(n)`
gives a step's micro-batches and measures in `last_wait_s` how long the trainer waited for them.

A sample that fails while its micro-batch is built (a truncated image the header read could not
see) is dropped from it and counted; a micro-batch never disappears (all samples gone: one pad
token without labels). `skip_metrics(group)`: `skipped_samples` counts each bad record once over
all ranks and epochs, `skipped_events` every time one was met.

`state_dict()` is (epoch, position in this rank's bins, seed, a fingerprint of the lengths);
`load_state_dict` makes the next micro-batch exactly the one an uninterrupted run would get.
Resuming with another dp size works when the global position divides by the new size.
"""
from __future__ import annotations

import collections
import logging
import time
import zlib
from typing import Optional, Sequence

import numpy as np
import torch

from lingshu_fast.data.batch import MicroBatch
from lingshu_fast.data.builder import BatchBuilder, BuildSpec
from lingshu_fast.data.dataset import open_parts, select_usable
from lingshu_fast.data.formats import DataError, SkipLog, SkipReason
from lingshu_fast.data.packing import plan_packing
from lingshu_fast.data.template import ChatTemplate
from lingshu_fast.data.workers import DeviceStager, WorkerPool, default_num_workers

logger = logging.getLogger(__name__)

MAX_LOGGED_SKIPS = 20


def _seed_for_epoch(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, dtype=np.uint32)[0])


class _Samples:
    """`loader.samples[i]`: sample i's record, read on demand (the loader holds no records)."""

    def __init__(self, loader: "PackedLoader"):
        self._loader = loader

    def __len__(self) -> int:
        return len(self._loader.lengths)

    def __getitem__(self, i: int):
        builder = self._loader._local_builder()
        part, k = builder.locate(int(self._loader.record_of[int(i)]))
        return part.read_sample(k)


class PackedLoader:
    """Iterator of MicroBatch for one data-parallel rank; see the module docstring."""

    def __init__(self, sources: Sequence, tokenizer, cfg, *, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, epochs: Optional[int] = None, device=None, index_dir: Optional[str] = None):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must lie in [0, dp_size={dp_size})")
        self.cfg, self.dp_rank, self.dp_size, self.seed, self.epochs = cfg, dp_rank, dp_size, seed, epochs
        self._ship_uint8 = cfg.image_transfer == "uint8" or (cfg.image_transfer == "auto" and torch.cuda.is_available())
        self.template = ChatTemplate(tokenizer, cfg.system_prompt)
        self.token_ids = self.template.ids
        self.limit = min(cfg.max_length, cfg.max_tokens_per_microbatch) if cfg.pack else cfg.max_length
        self.parts = open_parts(sources, self.template, cfg, index_dir=index_dir)
        self._startup = SkipLog(strict=cfg.strict, max_logged=MAX_LOGGED_SKIPS)
        why = (f"data.max_length={cfg.max_length}, data.max_tokens_per_microbatch={cfg.max_tokens_per_microbatch}, "
               f"data.pack={cfg.pack}")
        self.lengths, self.record_of, self.part_starts, empty = select_usable(
            self.parts, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels, limit=self.limit, why=why,
            skips=self._startup)
        self._startup.raise_if_strict()
        if empty:
            raise DataError(f"{empty[0]}; fix the records (data.strict=true lists each one) or remove the file "
                            f"from data.train")
        self._startup.log_summary(f"{len(self.lengths)} usable samples in {len(self.parts)} source(s)")
        self.samples = _Samples(self)
        self.fingerprint = zlib.crc32(self.lengths.tobytes()) ^ len(self.lengths)
        self.num_workers = default_num_workers() if cfg.num_workers is None else int(cfg.num_workers)
        self._stager = DeviceStager(device)
        self._events = {r.value: 0 for r in SkipReason}
        self._failed: set[int] = set()  # this rank's samples that failed while built
        self._failed_global: set[int] = set()  # all ranks' (as of the last skip_metrics)
        self._events_global = 0
        self._builder: Optional[BatchBuilder] = None
        self._pool: Optional[WorkerPool] = None
        self._plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._bin_counts: dict[int, int] = {}
        self.last_wait_s = 0.0
        self.epoch, self.position = 0, 0
        self._reset_feed()
        self.microbatches_in_epoch(0)  # too few micro-batches for dp_size is a start-up error
        if self.num_workers > 0 and self.template.backend is not None:
            self._fill()  # workers start (and build) while the trainer builds its model

    # -- start-up -------------------------------------------------------------------------------
    def _spec(self, for_workers: bool) -> BuildSpec:
        return BuildSpec(parts=self.parts, part_starts=self.part_starts,
                         tokenizer_json=self.template.backend.to_str() if for_workers else "",
                         token_ids=self.token_ids, system_prompt=self.template.system_prompt,
                         min_pixels=self.cfg.min_pixels, max_pixels=self.cfg.max_pixels, ship_uint8=self._ship_uint8)

    def _local_builder(self) -> BatchBuilder:
        if self._builder is None:
            self._builder = BatchBuilder(self._spec(False), template=self.template)
        return self._builder

    # -- planning -------------------------------------------------------------------------------
    def _global_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order, bin_offsets) of epoch `epoch` over all ranks."""
        seed = _seed_for_epoch(self.seed, epoch)
        if not self.cfg.pack:
            order = np.random.Generator(np.random.PCG64(seed)).permutation(len(self.lengths))
            return order, np.arange(len(order) + 1, dtype=np.int64)
        plan = plan_packing(self.lengths, self.cfg.max_tokens_per_microbatch, window=self.cfg.shuffle_window, seed=seed)
        assert len(plan.oversize) == 0, "too_long samples were filtered at start-up"
        return plan.order, plan.bin_offsets

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch not in self._plans:
            for old in [e for e in self._plans if e < epoch - 1 or e > epoch + 1]:
                del self._plans[old]
            self._plans[epoch] = self._global_plan(epoch)
            self._bin_counts[epoch] = len(self._plans[epoch][1]) - 1
        return self._plans[epoch]

    def microbatches_in_epoch(self, epoch: int) -> int:
        """This rank's micro-batches in `epoch` (floor(bins / dp): every rank the same)."""
        if epoch not in self._bin_counts:
            self._plan(epoch)
        per_rank = self._bin_counts[epoch] // self.dp_size
        if per_rank == 0:
            raise DataError(f"only {self._bin_counts[epoch]} micro-batches per epoch for {self.dp_size} data-parallel "
                            f"ranks: add data or lower data.max_tokens_per_microbatch")
        return per_rank

    def _bin(self, epoch: int, position: int) -> np.ndarray:
        order, offsets = self._plan(epoch)
        b = self.dp_rank + position * self.dp_size
        return order[offsets[b]:offsets[b + 1]]

    def __len__(self) -> int:
        """Micro-batches per epoch on this rank (the current epoch's plan; others differ by a few)."""
        return self.microbatches_in_epoch(self.epoch)

    def total_microbatches(self, enough: Optional[int] = None) -> int:
        """This rank's micro-batches over all `epochs` (what train.max_steps derives from); epochs
        are planned only until `enough` are counted (a set max_steps needs no more)."""
        if self.epochs is None:
            raise ValueError("an endless loader (epochs=None) has no total")
        total = 0
        for epoch in range(self.epochs):
            if enough is not None and total >= enough:
                break
            total += self.microbatches_in_epoch(epoch)
        return total

    def packing_efficiency(self, epoch: int = 0) -> float:
        """Real tokens / (micro-batches * budget) over all ranks' bins of `epoch` (1.0 = no padding)."""
        order, offsets = self._global_plan(epoch)
        budget = self.cfg.max_tokens_per_microbatch if self.cfg.pack else self.cfg.max_length
        return float(self.lengths[order].sum()) / ((len(offsets) - 1) * budget)

    # -- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> "PackedLoader":
        return self

    def _coordinates(self, epoch: int, position: int):
        """(epoch, position) of the micro-batches from here on, crossing epochs; stops at `epochs`."""
        while True:
            while position >= self.microbatches_in_epoch(epoch):
                if self.epochs is not None and epoch + 1 >= self.epochs:
                    return
                epoch, position = epoch + 1, 0
            yield epoch, position
            position += 1

    def _reset_feed(self) -> None:
        self._feed = self._coordinates(self.epoch, self.position)
        self._pending: collections.deque = collections.deque()  # (coord, Future) submitted to workers
        self._staged: collections.deque = collections.deque()  # (coord, handle, failures) on their way to the device

    def _submit(self) -> bool:
        coord = next(self._feed, None)
        if coord is None:
            return False
        ids = self._bin(*coord)
        if self._pool is None:
            self._pool = WorkerPool(self._spec(True), self.num_workers)
        self._pending.append((coord, self._pool.submit(ids.tolist(), self.record_of[ids].tolist())))
        return True

    def _fill(self) -> None:
        """Keep 2 micro-batches per worker submitted ahead of the trainer."""
        while len(self._pending) < 2 * self.num_workers and self._submit():
            pass

    def _next_built(self):
        """(coord, arrays, failures) of the next micro-batch, or None at the end of the stream."""
        if self.num_workers <= 0 or self.template.backend is None:
            coord = next(self._feed, None)
            if coord is None:
                return None
            ids = self._bin(*coord)
            return (coord, *self._local_builder().build(ids, self.record_of[ids]))
        self._fill()
        if not self._pending:
            return None
        coord, future = self._pending.popleft()
        return (coord, *future.result())

    def _stage_next(self) -> bool:
        built = self._next_built()
        if built is None:
            return False
        coord, arrays, failures = built
        self._staged.append((coord, self._stager.stage(MicroBatch.from_arrays(arrays)), failures))
        return True

    def __next__(self) -> MicroBatch:
        if not self._staged and not self._stage_next():
            raise StopIteration
        coord, handle, failures = self._staged.popleft()
        self._count_failures(failures)
        self.epoch, self.position = coord[0], coord[1] + 1
        return self._stager.ready(handle)

    def take_step(self, count: int) -> list[MicroBatch]:
        """The next `count` micro-batches (fewer at the end of the stream); `last_wait_s` is the time
        this took, the trainer's wait for data. The next micro-batch is staged ahead when built."""
        start = time.perf_counter()
        out = []
        for _ in range(count):
            try:
                out.append(next(self))
            except StopIteration:
                break
        if self._stager.stream is not None and not self._staged and self._pending and self._pending[0][1].done():
            self._stage_next()  # its host-to-device copy overlaps this step's compute
        self.last_wait_s = time.perf_counter() - start
        return out

    def build(self, sample_ids: Sequence[int]) -> MicroBatch:
        """The MicroBatch of these dataset indices (built here, failures counted)."""
        ids = np.asarray(sample_ids, dtype=np.int64)
        arrays, failures = self._local_builder().build(ids, self.record_of[ids])
        self._count_failures(failures)
        return MicroBatch.from_arrays(arrays)

    def _count_failures(self, failures) -> None:
        for sid, source, reason, message in failures:
            if self.cfg.strict:
                raise DataError(f"{source}: {reason}: {message}")
            self._events[reason] += 1
            if sid not in self._failed:
                self._failed.add(sid)
                logger.warning("skipping sample %s: %s: %s", source, reason, message)

    def close(self) -> None:
        """Stop the workers and close the data files (also safe to leave to garbage collection)."""
        for _, future in self._pending:
            future.cancel()
        self._reset_feed()
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        for part in self.parts:
            part.close()

    def __del__(self):
        try:
            if self._pool is not None:
                self._pool.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- metrics and resume ---------------------------------------------------------------------
    @property
    def skipped_startup(self) -> dict[str, int]:
        """Records dropped at start-up: the same on every rank (report once, do not all-reduce)."""
        return dict(self._startup.counts)

    @property
    def skipped_runtime(self) -> dict[str, int]:
        """Times this rank dropped a sample while building micro-batches (sum these over ranks)."""
        return dict(self._events)

    @property
    def skipped(self) -> dict[str, int]:
        return {k: self._startup.counts[k] + self._events[k] for k in self._events}

    def local_skip_metrics(self) -> dict[str, int]:
        """`skip_metrics` of this rank alone (what every rank of one data-parallel replica sees)."""
        startup = self._startup.total
        return {"skipped_samples": startup + len(self._failed), "skipped_events": startup + sum(self._events.values())}

    def skip_metrics(self, group=None, *, events_total: Optional[int] = None) -> dict[str, int]:
        """{"skipped_samples": distinct bad records over all ranks, "skipped_events": every time one
        was met}, start-up ones included. Collective over `group` (the data-parallel group; None: all
        ranks) when torch.distributed is initialised: every rank must call it at the same step.
        `events_total`: the sum of `skipped_runtime` over the group, already reduced by the caller
        (the step engine's one all-reduce): then only a change since the last call costs a
        collective (merging the sets of bad records, rare)."""
        import torch.distributed as dist

        startup = self._startup.total
        events = sum(self._events.values())
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return self.local_skip_metrics()
        if events_total is None:
            summed = torch.tensor([events], dtype=torch.int64,
                                  device="cuda" if dist.get_backend(group) == "nccl" else "cpu")
            dist.all_reduce(summed, group=group)
            events_total = int(summed.item())
        if events_total != self._events_global:  # someone met a bad sample since: merge the sets (rare)
            gathered = [None] * dist.get_world_size(group)
            dist.all_gather_object(gathered, sorted(self._failed), group=group)
            self._failed_global.update(i for ids in gathered for i in ids)
            self._events_global = events_total
        return {"skipped_samples": startup + len(self._failed_global), "skipped_events": startup + events_total}

    def state_dict(self) -> dict:
        return {"version": 1, "epoch": self.epoch, "position": self.position,
                "global_position": self.position * self.dp_size, "dp_size": self.dp_size,
                "seed": self.seed, "fingerprint": self.fingerprint, "num_samples": len(self.lengths),
                "skipped_runtime": dict(self._events), "failed_samples": sorted(self._failed | self._failed_global),
                "events_global": self._events_global}

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
        for _, future in self._pending:
            future.cancel()
        self.epoch, self.position = int(state["epoch"]), int(position)
        self._reset_feed()
        self._events.update(state.get("skipped_runtime", {}))
        self._failed_global = set(state.get("failed_samples", []))
        self._failed = set(self._failed_global)
        self._events_global = int(state.get("events_global", 0))


def resolve_max_steps(max_steps: Optional[int], available_steps: int, *, epochs: int, what: str = "steps") -> int:
    """train.max_steps of a run: null -> every step `epochs` epochs of data give; a set value larger
    than that is cut to it (the data ends first; the LR schedule must end there too)."""
    if available_steps < 1:
        raise DataError(f"train.epochs={epochs} epoch(s) of this data make no full step; add data, raise "
                        f"train.epochs or lower the batch (train.global_microbatches / rl.rollout_batch)")
    if max_steps is None:
        return available_steps
    if max_steps > available_steps:
        logger.warning("train.max_steps=%d but train.epochs=%d epoch(s) of the data make %d %s: training %d",
                       max_steps, epochs, available_steps, what, available_steps)
        return available_steps
    return max_steps
