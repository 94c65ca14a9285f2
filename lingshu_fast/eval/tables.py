"""Reading benchmark releases: rows from JSON / JSONL / CSV / TSV / Parquet files, the split files of a
Hugging Face dataset folder, and images embedded in Parquet rows.

Parquet is read with pyarrow (the `eval` extra: `pip install lingshu_fast[eval]`), imported only
when a Parquet file is read. VQA-RAD, PathVQA, MMMU, MedMCQA and the Medbullets sets are released
on the Hub as Parquet only (images as {"bytes", "path"} structs), so reading them needs a Parquet
reader; writing our own (Thrift metadata, Snappy pages, dictionary and RLE encodings, nested
structs) would be a second Parquet implementation to keep correct, for no gain over the reference one.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Optional

from lingshu_fast.eval.benchmark_files import BenchmarkError

TABLE_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv", ".tsv")


def read_rows(path: Path) -> list[dict]:
    """All rows of one table file as dicts (a JSON file holds a list of rows, or one row)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise BenchmarkError(f"{path}: cannot read ({err})") from None
    if suffix == ".jsonl":
        return _json_lines(path, text)
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":
                raise BenchmarkError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
            return _json_lines(path, text)  # JSON lines under a .json name (MedMCQA's dev.json)
        return data if isinstance(data, list) else [data]
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        return [dict(row) for row in reader]
    raise BenchmarkError(f"{path}: unsupported table format {suffix!r} (use {', '.join(TABLE_SUFFIXES)})")


def _json_lines(path: Path, text: str) -> list[dict]:
    rows = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise BenchmarkError(f"{path}:{line_no}: invalid JSON ({err.msg})") from None
    return rows


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BenchmarkError(f"{path}: reading Parquet needs pyarrow; pip install 'lingshu_fast[eval]' "
                             "(or pyarrow)") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises its own error types for corrupt files
        raise BenchmarkError(f"{path}: cannot read Parquet ({err})") from None


def split_files(folder: Path, split: str, suffixes: Iterable[str] = TABLE_SUFFIXES) -> list[Path]:
    """The files of one split in a dataset folder, Hugging Face style: `data/test-00000-of-00002.parquet`,
    `test.jsonl`, `phrases_no_exclude_test.jsonl`, … anywhere below `folder`, sorted (shard order)."""
    suffixes = tuple(suffixes)

    def is_split(stem: str) -> bool:
        return (stem == split or stem.startswith((split + "-", split + "_"))
                or stem.endswith(("_" + split, "-" + split)))

    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes and is_split(p.stem))


def read_split(folder: Path, split: str, what: str) -> tuple[list[dict], list[Path]]:
    files = split_files(folder, split)
    if not files:
        raise BenchmarkError(f"{folder}: no '{split}' split file for {what} (looked for {split}.jsonl, "
                             f"{split}-*.parquet, ... below it); point the benchmark at its release folder")
    rows = []
    for f in files:
        rows.extend(read_rows(f))
    return rows, files


_MAGIC = ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"GIF8", ".gif"), (b"BM", ".bmp"),
          (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"))


def image_path(value, root: Path, cache: Optional[Path], where: str) -> str:
    """A row's image -> a file path: a path string (relative to `root`), or a Hub image struct
    {"bytes", "path"} whose bytes are written once to `cache` (named by their SHA-1)."""
    if isinstance(value, dict) and value.get("bytes"):
        data = bytes(value["bytes"])
        if cache is None:
            raise BenchmarkError(f"{where}: the image is embedded in the file; pass an image cache folder")
        suffix = next((s for magic, s in _MAGIC if data.startswith(magic)), Path(str(value.get("path") or "")).suffix
                      or ".img")
        target = cache / (hashlib.sha1(data).hexdigest() + suffix)
        if not target.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            # atomic, and per process: every rank of a run loads the benchmarks and may write the same image
            tmp = target.with_suffix(f"{target.suffix}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
        return str(target)
    if isinstance(value, dict):
        value = value.get("path")
    if not isinstance(value, str) or not value:
        raise BenchmarkError(f"{where}: no image (expected a path or an embedded image)")
    full = Path(value) if Path(value).is_absolute() else root / value
    if not full.is_file():
        raise BenchmarkError(f"{where}: image not found: {full}; check the release's image folder")
    return str(full)
