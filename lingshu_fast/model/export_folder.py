"""Which folders an HF export may write to, and how an export of ours is recognised.

`save_pretrained` builds an export in a temp folder beside the target and renames it into place.
Before the rename it writes `lingshu_export.json` inside it: the list of the export's files. The
marker and the files therefore appear together (one rename), and a folder holding the marker is
"a previous export of ours". A target may be:
- missing or empty: written;
- a previous export holding nothing beyond its listed files: replaced, when the caller allows
  (`lingshu-fast export --overwrite`; a stage's own `run.dir/hf`, which a resumed run re-exports);
- anything else (a run folder, a checkpoint, a user's files, an export someone added files to):
  refused with one line, before anything is written, and nothing is deleted.
Temp folders carry `.lingshu_export_partial` while being written, so a crash's leftovers are
recognisably ours and the next export removes them (and nothing else beside the target).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from lingshu_fast.config import ConfigError

EXPORT_MARKER = "lingshu_export.json"
PARTIAL_MARKER = ".lingshu_export_partial"


class ExportTargetError(ConfigError):
    """The export folder holds something that is not a previous export of ours (one line)."""


def _export_files(path: str) -> Optional[set[str]]:
    """The files a previous export of ours wrote into `path` (from its marker), or None if it has none."""
    try:
        with open(os.path.join(path, EXPORT_MARKER)) as f:
            marker = json.load(f)
        return set(marker["files"]) if marker.get("format") == "lingshu-fast export" else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def export_target_problem(path: str, *, overwrite: bool) -> Optional[str]:
    """None when an export may be written to `path` (missing, empty, or with `overwrite` a previous
    export of ours and nothing else); otherwise why not, in one line that says what to do."""
    path = path.rstrip("/") or "/"
    if not os.path.lexists(path):
        return None
    if os.path.islink(path) or not os.path.isdir(path):
        return f"export folder {path} exists and is not a folder; pick a new or empty folder"
    entries = sorted(os.listdir(path))
    if not entries:
        return None
    ours = _export_files(path)
    if ours is None:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        return (f"export folder {path} is not empty ({shown}) and is not a lingshu-fast export: nothing was "
                f"written or deleted; pick a new or empty folder")
    extra = [e for e in entries if e not in ours and e != EXPORT_MARKER]
    if extra:
        return (f"export folder {path} holds a previous export plus files that are not part of it "
                f"({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}): move them out or pick another folder")
    if not overwrite:
        return (f"export folder {path} holds a previous export: replace it with `lingshu-fast export --overwrite`, "
                f"or pick another folder")
    return None


def adopt_folder(path: str) -> None:
    """Mark `path` (a folder of plain files, no marker yet) as ours to replace: for a folder whose every
    non-weight file the caller carries into the new export (the vLLM sync folder). A folder with
    sub-folders is left alone (the export would then refuse it)."""
    if not os.path.isdir(path) or _export_files(path) is not None:
        return
    entries = sorted(os.listdir(path))
    if entries and all(os.path.isfile(os.path.join(path, e)) and not os.path.islink(os.path.join(path, e))
                       for e in entries):
        write_marker(path, entries)


def write_marker(folder: str, files: list[str]) -> None:
    tmp = os.path.join(folder, f".{EXPORT_MARKER}.tmp")
    with open(tmp, "w") as f:
        json.dump({"format": "lingshu-fast export", "version": 1, "files": sorted(files)}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, EXPORT_MARKER))


def clean_leftovers(path: str) -> None:
    """Temp and set-aside folders of earlier exports to `path` that a crash left behind (ours only)."""
    parent, name = os.path.split(path)
    for entry in os.listdir(parent or "."):
        full = os.path.join(parent, entry)
        if not (entry.startswith(f"{name}.tmp-") or entry.startswith(f"{name}.old-")) or not os.path.isdir(full):
            continue
        if os.path.exists(os.path.join(full, PARTIAL_MARKER)) or _export_files(full) is not None:
            shutil.rmtree(full, ignore_errors=True)


def free_space_problem(folder: str, need_bytes: int) -> Optional[str]:
    """None when `folder`'s disk has room for `need_bytes` (+5% and 1 MB for headers and configs)."""
    need, free = int(need_bytes * 1.05) + (1 << 20), shutil.disk_usage(folder).free
    if free >= need:
        return None
    return f"an export needs ~{need / 1e9:.3g} GB, {free / 1e9:.3g} GB are free"
