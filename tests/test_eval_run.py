"""End-to-end evaluation (lingshu_fast.eval.run) of the tiny model on the tiny shipped benchmark.

The tiny model is random, so its accuracy means nothing; what is pinned is that the predictions
(exact strings) do not depend on the batch size nor on the parallel layout (TP=2, DP=2), that the
report, wrong items and per-item predictions are written, and that the CLI entry runs a recipe.
Greedy tokens must agree exactly across layouts: TP changes logits by ~1e-6 only, far below the
gaps between the top logits of this seeded model.
"""
import argparse
import json
import os

import pytest
import yaml

from lingshu_fast.parallel.spawn import spawn

EVAL_KW = dict(max_new_tokens=5, min_pixels=3136, max_pixels=12544)


pytestmark = pytest.mark.usefixtures("world_of_one")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from lingshu_fast.data.demo_data import build_demo_dataset
    from lingshu_fast.data.tokenizer import load_tokenizer
    from lingshu_fast.train.tiny import ensure_tiny_model

    root = tmp_path_factory.mktemp("evalrun")
    bench = build_demo_dataset(root / "data", num_train_images=2, num_eval_images=8)["eval"]
    tokenizer = load_tokenizer("tiny")
    folder = ensure_tiny_model(root / "tiny", tokenizer, seed=0)
    return root, str(bench), str(folder), tokenizer


def _predictions(out_dir, tag):
    with open(os.path.join(out_dir, f"{tag}_predictions.jsonl"), encoding="utf-8") as f:
        return [(row["id"], row["prediction"], row["correct"]) for row in map(json.loads, f)]


def test_evaluate_report_files_and_batch_size_invariance(setup):
    """Pins: prompts of different lengths and image counts batched together decode as they do in
    batches of another size (cache offsets, per-row stop); the report counts every item; the
    wrong items file holds exactly the wrong ones; metrics rows carry eval/<benchmark>/accuracy."""
    from lingshu_fast.eval.run import eval_metrics_rows, evaluate
    from lingshu_fast.model import from_pretrained

    root, bench, folder, tokenizer = setup
    model = from_pretrained(folder)
    out = root / "tp1"
    rep = evaluate(model, tokenizer, [bench], out_dir=out, batch_size=16, tag="big", **EVAL_KW)
    evaluate(model, tokenizer, [bench], out_dir=out, batch_size=3, tag="small", verbose=False, **EVAL_KW)
    big, small = _predictions(out, "big"), _predictions(out, "small")
    n_items = sum(1 for line in open(bench) if line.strip())
    assert len(big) == n_items and big == small
    assert all(isinstance(p, str) for _, p, _ in big)
    entry = rep["benchmarks"]["eval"]
    assert entry["total"] == n_items and entry["correct"] == sum(c for _, _, c in big)
    assert set(entry["by_category"]) == {"lesion_presence", "quadrant", "text_qa"}
    wrong = [json.loads(line) for line in open(out / "big_wrong.jsonl")]
    assert len(wrong) == n_items - entry["correct"] and not any(w["correct"] for w in wrong)
    assert json.loads((out / "big_report.json").read_text())["overall"]["total"] == n_items
    assert 0 < rep["generation"]["new_tokens"] <= n_items * EVAL_KW["max_new_tokens"]
    row, = eval_metrics_rows(rep, stage=3, step=40)
    assert row == {"stage": 3, "step": 40, "eval/eval/accuracy": entry["accuracy"],
                   "eval/overall/accuracy": rep["overall"]["accuracy"]}


def _layouts_worker(dims, bench, folder, out_dir, recipe):
    from lingshu_fast.data.tokenizer import load_tokenizer
    from lingshu_fast.eval.run import evaluate
    from lingshu_fast.model import from_pretrained
    from lingshu_fast.parallel.state import init_parallel

    tokenizer = load_tokenizer("tiny")
    tp_rep = evaluate(from_pretrained(folder), tokenizer, [bench], out_dir=out_dir, batch_size=16, tag="tp2",
                      verbose=False, **EVAL_KW)
    dims = init_parallel(1, 1, backend="gloo")  # same two processes, now data-parallel
    assert dims.dp == 2
    dp_rep = evaluate(from_pretrained(folder), tokenizer, [bench], out_dir=out_dir, batch_size=16, tag="dp2",
                      verbose=False, **EVAL_KW)
    from lingshu_fast.eval.run import main

    # the CLI entry under pp=2 (same two processes, now two pipeline stages), writing run.dir/eval
    assert main(argparse.Namespace(recipe=recipe, overrides=["parallel.pp=2", "parallel.pp_schedule=gpipe"])) == 0
    return tp_rep["overall"], dp_rep["overall"]


@pytest.mark.dist
def test_tp2_and_dp2_predictions_equal_tp1(setup):
    """Pins: TP ranks generate together (same tokens on both ranks), DP ranks split the items and
    gather the predictions back in order, pipeline stages (the CLI at parallel.pp=2) relay each
    step, and every rank returns rank 0's report."""
    from lingshu_fast.eval.run import evaluate
    from lingshu_fast.model import from_pretrained

    root, bench, folder, tokenizer = setup
    out = root / "layouts"
    evaluate(from_pretrained(folder), tokenizer, [bench], out_dir=out, batch_size=16, tag="tp1", verbose=False,
             **EVAL_KW)
    recipe = root / "pp2.yaml"
    recipe.write_text(yaml.safe_dump({
        "inherit": "tiny-base", "run": {"dir": str(root / "pp2_run")}, "model": {"init_from": folder},
        "data": {"min_pixels": EVAL_KW["min_pixels"], "max_pixels": EVAL_KW["max_pixels"]},
        "eval": {"benchmarks": [bench], "max_new_tokens": EVAL_KW["max_new_tokens"], "batch_size": 16}}))
    ranks = spawn(_layouts_worker, 2, bench, str(folder), str(out), str(recipe), tp=2)
    reference = _predictions(out, "tp1")
    assert _predictions(out, "tp2") == reference
    assert _predictions(out, "dp2") == reference
    assert _predictions(root / "pp2_run" / "eval", "eval") == reference
    assert ranks[0] == ranks[1]


def test_cli_main_runs_a_recipe_and_rejects_bad_layouts(setup, capsys):
    """Pins: `lingshu-fast eval RECIPE` loads model.init_from and eval.benchmarks and writes
    run.dir/eval; empty benchmarks and a layout the world cannot hold are one-line config errors
    (exit 2), not tracebacks."""
    from lingshu_fast.cli import main as cli_main

    root, bench, folder, _ = setup
    recipe = root / "eval.yaml"
    recipe.write_text(yaml.safe_dump({
        "inherit": "tiny-base", "run": {"dir": str(root / "cli_run")}, "model": {"init_from": folder},
        "eval": {"benchmarks": [bench], "max_new_tokens": 2, "batch_size": 16}}))
    assert cli_main(["eval", str(recipe)]) == 0
    assert (root / "cli_run" / "eval" / "eval_report.json").is_file()
    printed = capsys.readouterr().out
    assert "overall (micro)" in printed and "Lingshu-7B" in printed and "scoring: medevalkit" in printed
    assert cli_main(["eval", str(recipe), "eval.benchmarks=[]"]) == 2
    assert "eval.benchmarks is empty" in capsys.readouterr().err
    assert cli_main(["eval", str(recipe), "parallel.pp=2"]) == 2  # one process cannot hold two stages
    assert "not divisible by parallel.tp * parallel.pp" in capsys.readouterr().err


def test_main_is_the_cli_entry():
    """Pins the contract cli.py relies on: main(args) with args.recipe and args.overrides."""
    from lingshu_fast.eval.run import main

    with pytest.raises(Exception, match="not found"):
        main(argparse.Namespace(recipe="tiny-base", overrides=["eval.benchmarks=[/nonexistent/b.jsonl]"]))


def test_scheduled_eval_follows_eval_every(setup):
    """Pins the trainer hook: nothing between `eval.every` steps, metrics at multiples of it and
    at the end of a stage, reports named by stage and step, no eval without benchmarks."""
    from lingshu_fast.config import load_config
    from lingshu_fast.eval.run import scheduled_eval
    from lingshu_fast.model import from_pretrained

    root, bench, folder, tokenizer = setup
    model = from_pretrained(folder)
    cfg = load_config("tiny-base", [f"run.dir={root / 'sched'}", f"eval.benchmarks=[{bench}]", "eval.every=4",
                                    "eval.max_new_tokens=2", "eval.batch_size=32", "train.stage=2"])
    assert scheduled_eval(cfg, model, tokenizer, step=3) is None
    metrics = scheduled_eval(cfg, model, tokenizer, step=8)
    assert set(metrics) == {"eval/eval/accuracy", "eval/overall/accuracy"}
    assert (root / "sched" / "eval" / "stage2_step8_report.json").is_file()
    assert scheduled_eval(cfg, model, tokenizer, step=9, final=True) is not None
    cfg.eval.benchmarks = []
    assert scheduled_eval(cfg, model, tokenizer, step=8, final=True) is None
