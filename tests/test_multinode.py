"""Multi-node agreement: two "nodes" on this machine (`torchrun --nnodes 2 --node-rank {0,1}` over
gloo on localhost, sharing this filesystem) plan the same packing from the same seed and index."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from lingshu_fast.parallel.spawn import free_port

HERE = Path(__file__).resolve().parent


def _chat(user, answer, images=()):
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                       "images": list(images)})


def test_two_nodes_plan_the_same_packing(tmp_path):
    """Pins: ranks on different nodes compute the same global plan for every epoch (so their bins
    interleave into it without overlap), the index is built by one process for both nodes, and a
    bad sample met by different ranks in different epochs is counted once over all of them."""
    data = tmp_path / "text.jsonl"
    data.write_text("\n".join(_chat(f"question {k} " + "word " * (k % 9), f"answer {k}") for k in range(60)) + "\n")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(tmp_path / "full.png")
    raw = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(raw[: len(raw) // 2])
    images = tmp_path / "images.jsonl"
    images.write_text("\n".join([_chat("<image>x", "y", ["cut.png"])] * 2 + [_chat("<image>x", "y", ["full.png"])] * 4
                                + [_chat("t", f"u{k}") for k in range(2)]) + "\n")
    out = tmp_path / "report.json"
    torchrun = [sys.executable, "-m", "torch.distributed.run"]  # torchrun of this interpreter
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    procs = [subprocess.Popen([*torchrun, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
                               "--master_addr", "127.0.0.1", "--master_port", str(port),
                               str(HERE / "multinode_plan.py"), str(data), str(images), str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    reports = json.loads(out.read_text())
    assert sorted(r["node"] for r in reports) == [0, 1]
    assert len({r["digest"] for r in reports}) == 1
    assert sum(r["builds"] for r in reports) == 2  # one per data file, for both nodes
    world = len(reports)
    order, offsets = reports[0]["global"][0], reports[0]["offsets"][0]  # epoch 0's bins, all ranks
    bins = [order[offsets[b]:offsets[b + 1]] for b in range(len(offsets) - 1)]
    per_rank = len(bins) // world
    for r in reports:
        assert r["own"][:per_rank] == bins[r["rank"]::world][:per_rank]
    own = [i for r in reports for mb in r["own"][:per_rank] for i in mb]
    assert len(own) == len(set(own))
    assert all(r["metrics"] == {"skipped_samples": 2, "skipped_events": 4} for r in reports), [r["metrics"] for r in reports]
