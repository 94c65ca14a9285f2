"""`python scripts/install_stamp.py check|write`: is this environment's lingshu_fast install current?

scripts/install.sh runs it with the interpreter it installs into, and skips pip when `check` exits 0:
even a `pip install` of versions already there costs tens of seconds. The stamp is a file in the
environment (sys.prefix) holding the hash of what the install is made from (packaging files, the
native sources that `pip install -e` compiles, the install scripts) and of this checkout's path, since
the editable install points at one checkout. `check` also wants lingshu_fast and torch to be found,
lingshu_fast in this checkout: a stamp does not see a later `pip uninstall` or an install of another
checkout into the same environment.
"""
import hashlib
import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INPUT_FILES = ("setup.py", "pyproject.toml", "CMakeLists.txt",
               "scripts/install.sh", "scripts/python_env.sh", "scripts/install_stamp.py")
INPUT_DIRS = ("csrc",)
STAMP_PATH = Path(sys.prefix) / "lingshu_fast-install.stamp"


def inputs_hash(root: Path) -> str:
    """sha256 over the checkout's path and each input's name and bytes (a missing file counts too)."""
    h = hashlib.sha256(str(root).encode())
    names = list(INPUT_FILES)
    for folder in INPUT_DIRS:
        if (root / folder).is_dir():
            names += sorted(p.relative_to(root).as_posix() for p in (root / folder).rglob("*") if p.is_file())
    for name in names:
        path = root / name
        h.update(b"\0" + name.encode() + b"\0")
        h.update(path.read_bytes() if path.is_file() else b"<missing>")
    return h.hexdigest()


def stale_reason(root: Path) -> str:
    """Why pip must run ('' when the install is current)."""
    if not STAMP_PATH.is_file():
        return f"no stamp {STAMP_PATH}"
    if STAMP_PATH.read_text().strip() != inputs_hash(root):
        return "setup.py, pyproject.toml, the native sources or the install scripts changed"
    for name in ("lingshu_fast", "torch"):
        if importlib.util.find_spec(name) is None:
            return f"{name} is not installed"
    origin = Path(importlib.util.find_spec("lingshu_fast").origin).resolve()
    if root not in origin.parents:
        return f"lingshu_fast is installed from {origin.parent.parent}, not this checkout"
    return ""


def write_stamp(root: Path) -> None:
    """Atomically, so that an interrupted write leaves no stamp rather than a wrong one."""
    tmp = STAMP_PATH.with_name(STAMP_PATH.name + f".{os.getpid()}.tmp")
    tmp.write_text(inputs_hash(root) + "\n")
    os.replace(tmp, STAMP_PATH)


def main(argv: list) -> int:
    if argv == ["check"]:
        reason = stale_reason(ROOT)
        if reason:
            print(f"scripts/install.sh: installing into {sys.prefix} ({reason})", file=sys.stderr)
        return 1 if reason else 0
    if argv == ["write"]:
        write_stamp(ROOT)
        return 0
    print("usage: python scripts/install_stamp.py check|write", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
