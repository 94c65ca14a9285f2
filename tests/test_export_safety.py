"""An export never destroys data: `lingshu-fast export` and `save_pretrained` replace only a previous
export of ours (recognised by the `lingshu_export.json` marker written inside the folder before it
is renamed into place) and refuse every other non-empty folder with one line, deleting nothing.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lingshu_fast.model as M
from lingshu_fast.cli import main as cli_main

EXPORT_MARKER = "lingshu_export.json"
pytestmark = pytest.mark.usefixtures("world_of_one")


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_refusal(capsys, argv) -> str:
    status = cli_main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny stage-3 run of 2 steps, then resumed to 3: the resumed run re-exports over run.dir/hf."""
    from megatron.core import parallel_state as ps

    from lingshu_fast.config import load_config
    from lingshu_fast.data.demo_data import build_demo_dataset
    from lingshu_fast.parallel.state import current_dims
    from lingshu_fast.train.loop import train

    if not ps.model_parallel_is_initialized():  # what the world_of_one fixture does, for this module fixture
        os.environ.pop("WORLD_SIZE", None)
        from lingshu_fast.parallel.state import init_parallel

        init_parallel(1, 1, backend="gloo")
    root = tmp_path_factory.mktemp("export_safety")
    data = build_demo_dataset(root / "data", num_train_images=8, num_eval_images=2)
    run_dir = root / "run"
    for steps in (2, 3):
        train(load_config("tiny-sft", [f"run.dir={run_dir}", f"data.train=[{data['instruct']}]", "run.progress=false",
                                       f"train.max_steps={steps}", "checkpoint.every=0", "train.global_microbatches=1"]),
              current_dims())
    return run_dir


def test_resumed_run_re_exports_over_its_own_export(trained_run):
    """Pins: the end-of-stage export of a resumed run replaces run.dir/hf (a previous export of ours,
    tokenizer included in the marker) while checkpoints and metrics stay."""
    listed = (trained_run / "hf" / EXPORT_MARKER).read_text()
    assert "tokenizer.json" in listed and "config.json" in listed
    assert (trained_run / "checkpoints" / "step_000003").is_dir() and (trained_run / "metrics.jsonl").exists()
    assert not [p for p in trained_run.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_export_refuses_foreign_folders_and_deletes_nothing(tmp_path, capsys, trained_run):
    """Pins the data-loss bug: exporting into a non-empty folder (a user's folder, the run folder
    itself) used to move it aside and delete it, with exit 0. Now: one line, exit 2, and every byte
    is still there - with or without --overwrite."""
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    (user / "sub").mkdir()
    (user / "sub" / "data.bin").write_bytes(b"\x00" * 10)
    before_user, before_run = _tree(user), _tree(trained_run)
    for extra in ([], ["--overwrite"]):
        err = _one_line_refusal(capsys, ["export", str(trained_run), str(user), *extra])
        assert str(user) in err and "not a lingshu-fast export" in err
        err = _one_line_refusal(capsys, ["export", str(trained_run), str(trained_run), *extra])
        assert str(trained_run) in err
    assert _tree(user) == before_user and _tree(trained_run) == before_run


def test_previous_export_needs_overwrite_and_nothing_extra(tmp_path, capsys, trained_run):
    """Pins: a previous export is replaced only with --overwrite, and not even then when someone put
    files of their own into it; a nonexistent source is named as such (it used to report a missing
    manifest, as if a save had been interrupted)."""
    prev = tmp_path / "prev"
    shutil.copytree(trained_run / "hf", prev)
    err = _one_line_refusal(capsys, ["export", str(trained_run), str(prev)])
    assert "holds a previous export" in err and "--overwrite" in err
    (prev / "README.md").write_text("my notes")
    err = _one_line_refusal(capsys, ["export", str(trained_run), str(prev), "--overwrite"])
    assert "README.md" in err and (prev / "README.md").read_text() == "my notes"
    err = _one_line_refusal(capsys, ["export", str(tmp_path / "no_such_run"), str(tmp_path / "out")])
    assert "does not exist" in err and "manifest" not in err
    (prev / "README.md").unlink()
    # the replacement itself: a fresh process (an export initialises and shuts down its process group)
    proc = subprocess.run([sys.executable, "-m", "lingshu_fast.cli", "export", str(trained_run), str(prev),
                           "--overwrite"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step 3" in proc.stdout and (prev / EXPORT_MARKER).exists() and (prev / "tokenizer.json").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_save_pretrained_spares_neighbours_and_foreign_folders(tmp_path):
    """Pins the library call: a foreign non-empty target raises ExportTargetError before anything is
    written (even with overwrite=True); folders beside the target named like its old fixed temp
    names (`X.tmp`, `X.old`) are not deleted; an interrupted export's temp folder is cleaned."""
    from lingshu_fast.model.checkpoint_io import ExportTargetError

    model = M.build_model(M.tiny_hf_config(num_hidden_layers=1), seed=0)
    target = tmp_path / "export"
    neighbours = [tmp_path / "export.tmp", tmp_path / "export.old"]
    for folder in neighbours:
        folder.mkdir()
        (folder / "precious.txt").write_text("user data")
    crashed = tmp_path / "export.tmp-deadbeef"  # what a crash mid-export leaves
    crashed.mkdir()
    (crashed / ".lingshu_export_partial").touch()
    M.save_pretrained(model, str(target))
    M.save_pretrained(model, str(target))  # the default replaces a previous export
    assert all((folder / "precious.txt").read_text() == "user data" for folder in neighbours)
    assert not crashed.exists() and (target / EXPORT_MARKER).exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "a.txt").write_text("x")
    with pytest.raises(ExportTargetError, match="not a lingshu-fast export"):
        M.save_pretrained(model, str(foreign), overwrite=True)
    assert os.listdir(foreign) == ["a.txt"] and not list(tmp_path.glob("foreign.tmp-*"))


def test_export_checks_free_space_first(tmp_path, monkeypatch):
    """Pins: an export that cannot fit stops before writing (no temp folder left to fill the disk),
    and the CLI words it as `no space left on device: FOLDER (an export needs ~X GB, Y GB are free)`."""
    import errno

    from lingshu_fast.cli import user_error_message

    model = M.build_model(M.tiny_hf_config(num_hidden_layers=1), seed=0)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(OSError) as info:
        M.save_pretrained(model, str(tmp_path / "export"))
    assert info.value.errno == errno.ENOSPC and os.listdir(tmp_path) == []
    message = user_error_message(info.value)
    assert message.startswith(f"no space left on device: {tmp_path} (an export needs ~") and "GB are free" in message
