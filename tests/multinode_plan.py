"""Run by test_multinode.py under `torchrun --nnodes 2 --node-rank {0,1}`: every rank opens the same
data (the index built once by whichever rank takes the lock), plans two epochs, and reports what it
planned and read; rank 0 writes all ranks' reports to OUT. Not a test module itself."""
import hashlib
import json
import logging
import os
import sys

import torch.distributed as dist


class _Builds(logging.Handler):
    def __init__(self):
        super().__init__()
        self.count = 0

    def emit(self, record):
        self.count += "indexed " in record.getMessage()


def main(data: str, images_data: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    builds = _Builds()
    logging.getLogger("lingshu_fast.data.index").addHandler(builds)
    logging.getLogger("lingshu_fast.data.index").setLevel(logging.INFO)
    from lingshu_fast.config import DataConfig
    from lingshu_fast.data.loader import PackedLoader
    from lingshu_fast.data.tokenizer import load_tokenizer

    tok = load_tokenizer("tiny")
    cfg = DataConfig(train=[data], max_tokens_per_microbatch=96, max_length=96, shuffle_window=16, num_workers=0)
    loader = PackedLoader(cfg.train, tok, cfg, seed=5, dp_rank=rank, dp_size=world, epochs=2)
    digest = hashlib.sha256()
    for epoch in range(2):
        order, offsets = loader._global_plan(epoch)
        digest.update(order.tobytes() + offsets.tobytes())
    own = [mb.sample_ids for mb in loader]
    # bad samples met on different ranks in different epochs: counted once over all ranks
    cfg = DataConfig(train=[images_data], max_pixels=56 * 56, max_tokens_per_microbatch=128, max_length=128,
                     pack=False, num_workers=0)
    skipping = PackedLoader(cfg.train, tok, cfg, seed=1, dp_rank=rank, dp_size=world, epochs=2)
    metrics = None
    while skipping.take_step(1):
        metrics = skipping.skip_metrics(None)  # collective, every rank every step
    report = {"rank": rank, "node": int(os.environ["GROUP_RANK"]), "digest": digest.hexdigest(), "own": own,
              "builds": builds.count, "metrics": metrics,
              "global": [[int(i) for i in loader._global_plan(e)[0]] for e in range(2)],
              "offsets": [[int(i) for i in loader._global_plan(e)[1]] for e in range(2)]}
    gathered = [None] * world
    dist.all_gather_object(gathered, report)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
