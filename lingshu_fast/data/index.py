"""The data index: one compact, memory-mapped file per JSONL file, built once and shared by every rank.

What it holds, per usable record in file order: the byte offset and length of its line, its line
number, the token count of its rendered text (chat template, one `<|image_pad|>` per image), and the
(height, width) of each of its images read from the file headers. Packing needs only lengths:
`text_tokens + sum(image tokens - 1)`, the image tokens following from the sizes by smart_resize
with this run's min/max pixels (`lengths`). Bad records found while indexing are kept as
(line, reason, message) so that every run can count and report them without re-reading the data.

Where: next to the JSONL (`DATA.jsonl.<settings>.lfidx`), or under `data.index_dir`, or, when the
data's folder is not writable, under ~/.cache/lingshu_fast/index. `<settings>` is a digest of what
the content depends on (index format, tokenizer, system prompt, image root and confinement, train
or prompt records), so runs with other settings keep their own index beside it.

Freshness: the header records the data file's absolute path, size, mtime (ns) and the sha256 of
its first MiB; an index whose key differs from the file's is rebuilt, never trusted. An index built
without decoding the images (`images_verified: false`) is rebuilt with decoding for data.strict=true.

Building once: the first process takes an exclusive POSIX lock (`fcntl.lockf`) on `<index>.lock`,
re-checks, builds into a temporary file and renames it into place; the others block on the lock
and then map the finished file. This works between ranks of one node and between nodes sharing a
filesystem (NFS and Lustre honour POSIX locks; a lock is released if its holder dies). Where the
filesystem refuses locks, every process builds on its own and renames atomically: the content is
deterministic, so the last rename wins with the same bytes.

File layout: b"LSFIDX01", the header's length (8 bytes, little endian), the header as JSON
(array names, dtypes, shapes and byte offsets), then the arrays, each 64-byte aligned, read with
np.memmap (pages are shared between the processes of a node through the page cache).
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from lingshu_fast.data.formats import DataError, SkipReason

logger = logging.getLogger(__name__)

INDEX_VERSION = 1
MAGIC = b"LSFIDX01"
HEAD_BYTES = 1 << 20  # the content hash covers the first MiB
ALIGN = 64
REASONS = [r.value for r in SkipReason]  # bad_reason codes index this list


@dataclass(frozen=True)
class IndexSettings:
    """What an index's content depends on besides the data file (its digest names the file)."""
    tokenizer: str  # sha256 of the serialised tokenizer
    system_prompt: str
    image_root: Optional[str]
    confine: bool
    mode: str = "train"  # "train": records need an assistant turn; "prompt": RL prompts

    def digest(self) -> str:
        text = json.dumps({"version": INDEX_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def tokenizer_digest(tokenizer) -> str:
    """sha256 of the tokenizer as the Rust library serialises it (vocab, merges, added tokens,
    normaliser, pre-tokeniser): equal digests give equal token ids."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    text = backend.to_str() if hasattr(backend, "to_str") else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def source_key(path: Union[str, Path]) -> dict:
    """What makes an index fresh for `path`: absolute path, size, mtime and a hash of the head."""
    path = Path(path).resolve()
    stat = path.stat()
    with open(path, "rb") as handle:
        head = hashlib.sha256(handle.read(HEAD_BYTES)).hexdigest()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "head_sha256": head}


# -- file format ----------------------------------------------------------------------------------
def write_index(path: Path, header: dict, arrays: dict[str, np.ndarray]) -> None:
    """Atomically write `header` + `arrays` to `path` (temporary file, fsync, rename)."""
    meta, offset = {}, 0
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        arrays[name] = array
        meta[name] = {"dtype": array.dtype.str, "shape": list(array.shape), "offset": offset}
        offset += -(-array.nbytes // ALIGN) * ALIGN
    head = json.dumps({**header, "arrays": meta}).encode("utf-8")
    start = -(-(len(MAGIC) + 8 + len(head)) // ALIGN) * ALIGN
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(MAGIC + len(head).to_bytes(8, "little") + head)
            out.write(b"\0" * (start - out.tell()))
            for name, array in arrays.items():
                out.write(b"\0" * (start + meta[name]["offset"] - out.tell()))
                out.write(array.tobytes())
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_header(path: Path) -> Optional[tuple[dict, int]]:
    """(header, offset of the first array) or None when the file is absent or not an index."""
    try:
        with open(path, "rb") as handle:
            if handle.read(len(MAGIC)) != MAGIC:
                return None
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size).decode("utf-8"))
    except (OSError, ValueError):
        return None
    return header, -(-(len(MAGIC) + 8 + size) // ALIGN) * ALIGN


class DataIndex:
    """A loaded index: read-only memory-mapped arrays (see the module docstring) + its header."""

    def __init__(self, path: Path, header: dict, start: int):
        self.path, self.header = path, header
        self.arrays: dict[str, np.ndarray] = {}
        for name, meta in header["arrays"].items():
            shape = tuple(meta["shape"])
            if int(np.prod(shape)) == 0:
                self.arrays[name] = np.zeros(shape, dtype=np.dtype(meta["dtype"]))
            else:
                self.arrays[name] = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r",
                                              offset=start + meta["offset"], shape=shape)

    def __getattr__(self, name: str) -> np.ndarray:
        arrays = self.__dict__.get("arrays", {})
        if name in arrays:
            return arrays[name]
        raise AttributeError(name)

    @property
    def num_records(self) -> int:
        return int(self.header["num_records"])

    @property
    def data_path(self) -> str:
        return self.header["source"]["path"]


def pack_bad(bad: list[tuple[int, str, str]]) -> dict[str, np.ndarray]:
    """(line, reason, message) records -> the index's bad_* arrays."""
    messages = [m.encode("utf-8") for _, _, m in bad]
    bounds = np.zeros(len(bad) + 1, dtype=np.int64)
    np.cumsum([len(m) for m in messages], out=bounds[1:])
    return {"bad_line": np.asarray([b[0] for b in bad], dtype=np.int64),
            "bad_reason": np.asarray([REASONS.index(b[1]) for b in bad], dtype=np.uint8),
            "bad_message": np.frombuffer(b"".join(messages), dtype=np.uint8).copy(),
            "bad_message_offset": bounds}


# -- where, fresh, lock -----------------------------------------------------------------------------
def _writable(folder: Path) -> bool:
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


def index_locations(data_path: Union[str, Path], settings: IndexSettings,
                    index_dir: Optional[str] = None) -> list[Path]:
    """Where the index of `data_path` under `settings` may live, in order of preference: under
    data.index_dir when set, else next to the data, then the user's cache folder (see the module
    docstring). A fresh index is taken from any of them; a new one is written to the first
    writable folder."""
    data_path = Path(data_path).resolve()
    name = f"{data_path.name}.{settings.digest()}.lfidx"
    # files of the same name in different folders must not share an index in a common folder
    unique = f"{hashlib.sha256(str(data_path).encode()).hexdigest()[:8]}-{name}"
    if index_dir is not None:
        return [Path(index_dir).expanduser().resolve() / unique]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lingshu_fast" / "index"
    return [data_path.parent / name, cache / unique]


def fresh(header: Optional[dict], key: dict, settings: IndexSettings, need_verified: bool) -> bool:
    if header is None or header.get("version") != INDEX_VERSION:
        return False
    if header.get("source") != key or header.get("settings") != asdict(settings):
        return False
    return header.get("images_verified", False) or not need_verified


def load_fresh(path: Path, key: dict, settings: IndexSettings, need_verified: bool) -> Optional[DataIndex]:
    found = read_header(path)
    if found is None or not fresh(found[0], key, settings, need_verified):
        return None
    return DataIndex(path, *found)


@contextmanager
def build_lock(path: Path):
    """An exclusive POSIX lock on `<path>.lock` for the time of a build (blocks until it is ours).
    Yields False when the filesystem refuses locks: the caller then builds without one."""
    import fcntl

    lock_path = path.with_name(path.name + ".lock")
    handle = open(lock_path, "a+b")
    try:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX)
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            logger.warning("%s: the filesystem refuses file locks (%s); building the index in every process",
                           lock_path, err)
            yield False
            return
        try:
            yield True
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


def open_index(data_path: Union[str, Path], settings: IndexSettings, build, *, index_dir: Optional[str] = None,
               need_verified: bool = False) -> DataIndex:
    """The fresh index of `data_path`, building it once if needed: `build(data_path, verify) ->
    (header extras, arrays)` runs in the one process that holds the lock."""
    data_path = Path(data_path)
    if not data_path.is_file():
        raise DataError(f"data file not found: {data_path} (data.train); give existing JSONL files")
    key = source_key(data_path)
    locations = index_locations(data_path, settings, index_dir)
    for path in locations:
        loaded = load_fresh(path, key, settings, need_verified)
        if loaded is not None:
            return loaded
    for path in locations:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if _writable(path.parent):
            break
    else:
        raise DataError(f"no writable folder for the index of {data_path} (tried {[str(p.parent) for p in locations]}); "
                        f"set data.index_dir to a writable folder")
    with build_lock(path):
        loaded = load_fresh(path, key, settings, need_verified)  # another process built it meanwhile
        if loaded is not None:
            return loaded
        extras, arrays = build(data_path, need_verified)
        if source_key(data_path) != key:
            raise DataError(f"{data_path} changed while it was being indexed; run again once it is complete")
        header = {"version": INDEX_VERSION, "source": key, "settings": asdict(settings),
                  "images_verified": need_verified, **extras}
        write_index(path, header, arrays)
        logger.info("indexed %s: %d usable records -> %s", data_path, header["num_records"], path)
    loaded = load_fresh(path, key, settings, need_verified)
    if loaded is None:
        raise DataError(f"the index {path} of {data_path} could not be read back after writing it; "
                        f"check the disk, or set data.index_dir to another folder")
    return loaded
