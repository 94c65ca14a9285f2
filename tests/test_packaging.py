"""Packaging: `kernels/` and `parallel/` are reachable only as lingshu_fast.kernels / .parallel.

Pins DESIGN.md's rule: a top-level `kernels` would collide with the PyPI package transformers
probes for (and, from 5.25 on, installs and imports: then `kernels` in sys.modules is that package,
never our folder), and a second copy of every kernel module would be imported. Run in a fresh process
from a neutral folder, as a user's script would be."""
import subprocess
import sys


def _python(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_kernels_and_parallel_are_not_top_level(tmp_path):
    code = (
        "import importlib.util, sys\n"
        "import lingshu_fast.kernels, lingshu_fast.parallel\n"
        "import transformers\n"
        "from transformers import Qwen2_5_VLForConditionalGeneration\n"
        "assert importlib.util.find_spec('parallel') is None, 'top-level parallel found'\n"
        "import pathlib\n"
        "ours = str(pathlib.Path(lingshu_fast.kernels.__file__).parent)\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "assert spec is None or not str(spec.origin).startswith(ours), spec.origin\n"
        "theirs = [m for m in sys.modules if m == 'kernels' or m.startswith('kernels.')]\n"
        "assert all(not str(getattr(sys.modules[m], '__file__', '')).startswith(ours) for m in theirs), theirs\n"
        "print(lingshu_fast.kernels.fused_linear_cross_entropy.__module__)\n"
    )
    proc = _python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "lingshu_fast.kernels.fused_linear_cross_entropy"


def test_console_script_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lingshu_fast.cli", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "train" in proc.stdout and "demo" in proc.stdout


def test_repo_root_on_sys_path_gives_a_clear_error_and_the_scripts_keep_it_off(tmp_path):
    """Started in the repository root (`python -m`), the root is on sys.path and our kernels/ folder is
    found as a top-level `kernels`, shadowing Hugging Face's package of that name (which transformers
    >= 5.25 installs and imports from): a name imported from it raises an ImportError that says why
    and what to do, while probes for dunders get their default. The scripts export PYTHONSAFEPATH=1,
    so `python -m` there never puts the root on sys.path."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("import sys\n"
            f"sys.path.insert(0, {str(root)!r})\n"
            "import kernels\n"
            "assert getattr(kernels, '__version__', 'N/A') == 'N/A'\n"
            "from kernels import CUDAProperties\n")
    proc = _python(code, tmp_path)
    assert proc.returncode == 1 and "PYTHONSAFEPATH=1" in proc.stderr and "repository root" in proc.stderr, \
        proc.stderr[-2000:]
    env_line = subprocess.run(["bash", "-c", f"source {root}/scripts/python_env.sh && echo $PYTHONSAFEPATH"],
                              capture_output=True, text=True, timeout=60).stdout.strip()
    assert env_line == "1"
