"""scripts/install.sh: which environment it installs into, and when a re-run skips pip.

Drives the real scripts (python_env.sh, install.sh, install_stamp.py), copied into a temporary
checkout, with real interpreters: the base Python this suite's virtualenv was made from, virtualenvs
made from it, and wrappers around it posing as a conda environment or as a Debian Python without
python3-venv. Nothing is pip-installed: the user environments here have no pip, so an install.sh that
wrongly decides to run pip fails. Pins that (a) a base interpreter (Debian's externally-managed one,
pyenv's) goes to the project .venv/, while a virtualenv, an activated one or a conda environment is
used as it is, so a user's CUDA torch stays; (b) a missing ensurepip stops with the one-line apt hint;
(c) the stamp skips pip only while setup.py, pyproject.toml, the native sources and the install scripts
are unchanged, for this checkout, with lingshu_fast and torch still found.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("setup.py", "pyproject.toml", "CMakeLists.txt", "csrc",
          "scripts/python_env.sh", "scripts/install.sh", "scripts/install_stamp.py")
ENV_PROBE = ("import os, sys; print(sys.prefix != sys.base_prefix or "
             "os.path.isdir(os.path.join(sys.prefix, 'conda-meta')))")


def _run(cmd, env, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def _env(path_first=None, **extra) -> dict:
    """The caller's environment without PYTHON or an activated virtualenv, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV", "CONDA_PREFIX")}
    if path_first:
        env["PATH"] = f"{path_first}{os.pathsep}{env['PATH']}"
    env.update(extra)
    return env


def _wrapper(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def base_python() -> str:
    """A Python that is neither a virtualenv nor a conda environment, as /usr/bin/python3 is."""
    exe = getattr(sys, "_base_executable", sys.executable)
    probe = _run([exe, "-c", ENV_PROBE], _env())
    if probe.returncode != 0 or probe.stdout.strip() != "False":
        pytest.skip(f"no base interpreter to make virtualenvs from ({exe} is itself an environment)")
    return exe


@pytest.fixture
def repo(tmp_path) -> Path:
    """A checkout holding what the install scripts read, plus a lingshu_fast package to be found."""
    dst = tmp_path / "repo"
    for name in COPIED:
        src, out = ROOT / name, dst / name
        out.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, out)
    (dst / "lingshu_fast").mkdir()
    (dst / "lingshu_fast" / "__init__.py").write_text("")
    return dst


@pytest.fixture
def user_venv(tmp_path, base_python) -> Path:
    """A user's own virtualenv, without pip, that finds the temporary checkout's lingshu_fast and a
    torch (as an editable install and an installed torch would be found)."""
    venv = tmp_path / "user-venv"
    proc = _run([base_python, "-m", "venv", "--without-pip", str(venv)], _env())
    assert proc.returncode == 0, proc.stderr
    site = _run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                _env())
    torch_dir = tmp_path / "site" / "torch"
    torch_dir.mkdir(parents=True)
    (torch_dir / "__init__.py").write_text("")
    Path(site.stdout.strip(), "checkout.pth").write_text(f"{tmp_path / 'repo'}\n{tmp_path / 'site'}\n")
    return venv


def _target(repo: Path, env: dict) -> subprocess.CompletedProcess:
    return _run(["bash", str(repo / "scripts" / "python_env.sh"), "target"], env)


def test_base_interpreter_goes_to_project_venv(repo, base_python, tmp_path):
    """PEP 668: a Debian/Ubuntu system Python refuses pip, so a base Python must never be the target."""
    proc = _target(repo, _env(PYTHON=base_python))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(repo / ".venv" / "bin" / "python")
    # Unset PYTHON means python3 on PATH.
    bin_dir = tmp_path / "bin"
    _wrapper(bin_dir / "python3", f'exec "{base_python}" "$@"')
    proc = _target(repo, _env(path_first=bin_dir))
    assert proc.stdout.strip() == str(repo / ".venv" / "bin" / "python"), proc.stderr


def test_virtualenv_is_used_as_it_is(repo, user_venv):
    """A user's own environment keeps its torch (a CUDA build) only if install.sh installs into it."""
    py = user_venv / "bin" / "python"
    proc = _target(repo, _env(PYTHON=str(py)))
    assert proc.stdout.strip() == str(py), proc.stderr
    # Activated: python3 on PATH is the virtualenv's; its symlink must not be resolved to the base.
    activated = _env(path_first=user_venv / "bin", VIRTUAL_ENV=str(user_venv))
    assert _target(repo, activated).stdout.strip() == str(user_venv / "bin" / "python3")
    # A relative PYTHON is taken from the caller's folder, not from the repo root the scripts cd to.
    proc = _run(["bash", str(repo / "scripts" / "python_env.sh"), "target"],
                _env(PYTHON="user-venv/bin/python"), cwd=user_venv.parent)
    assert proc.stdout.strip() == str(py), proc.stderr


def test_set_python_wins_over_activated_venv(repo, user_venv, base_python):
    activated = _env(path_first=user_venv / "bin", VIRTUAL_ENV=str(user_venv), PYTHON=base_python)
    assert _target(repo, activated).stdout.strip() == str(repo / ".venv" / "bin" / "python")


def test_conda_environment_is_used_as_it_is(repo, base_python, tmp_path):
    """A conda env is a prefix of its own (sys.prefix == sys.base_prefix): only conda-meta tells it.
    Posed here by the base interpreter run with PYTHONHOME at a prefix that has conda-meta."""
    stdlib = _run([base_python, "-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"], _env())
    prefix = tmp_path / "conda-env"
    (prefix / "conda-meta").mkdir(parents=True)
    (prefix / "lib").mkdir()
    stdlib_dir = Path(stdlib.stdout.strip())
    (prefix / "lib" / stdlib_dir.name).symlink_to(stdlib_dir)
    py = _wrapper(prefix / "bin" / "python", f'PYTHONHOME="{prefix}" exec "{base_python}" "$@"')
    probe = _run([str(py), "-c", "import sys; print(sys.prefix == sys.base_prefix == sys.argv[1])", str(prefix)],
                 _env())
    if probe.stdout.strip() != "True":
        pytest.skip(f"could not pose a conda prefix with PYTHONHOME: {probe.stderr[-300:]}")
    proc = _target(repo, _env(PYTHON=str(py)))
    assert proc.stdout.strip() == str(py), proc.stderr


@pytest.mark.parametrize("python", ["/nonexistent/python3", "/bin/true"])
def test_not_a_python_is_a_one_line_error(repo, python):
    proc = _target(repo, _env(PYTHON=python))
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and python in proc.stderr and "set PYTHON" in proc.stderr


def test_missing_ensurepip_prints_apt_hint_and_stops(repo, base_python, tmp_path):
    """Debian/Ubuntu ship ensurepip in python3-venv: without it `python3 -m venv` cannot make a venv
    with pip. install.sh must stop with one line naming the package, before any pip or venv step."""
    shadow = tmp_path / "no-ensurepip" / "ensurepip"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'ensurepip'\", name='ensurepip')\n")
    py = _wrapper(tmp_path / "debian" / "python3", f'PYTHONPATH="{shadow.parent}" exec "{base_python}" "$@"')
    assert _run([str(py), "-c", "import ensurepip"], _env()).returncode != 0
    proc = _run(["bash", str(repo / "scripts" / "install.sh")], _env(PYTHON=str(py)))
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "apt-get install python3-venv" in proc.stderr and "python3." in proc.stderr
    assert not (repo / ".venv").exists()


@pytest.mark.slow
def test_project_venv_is_made_with_pip_then_reused(repo, base_python):
    """A half-made .venv/ (no pip: what `python3 -m venv` leaves when ensurepip fails) is rebuilt with
    --clear; a good one is kept, not re-made, so a re-run costs no venv creation (~15 s here)."""
    if _run([base_python, "-c", "import venv, ensurepip"], _env()).returncode != 0:
        pytest.skip(f"{base_python} has no ensurepip (python3-venv) to make a virtualenv with pip")
    assert _run([base_python, "-m", "venv", "--without-pip", str(repo / ".venv")], _env()).returncode == 0
    ensure = ["bash", str(repo / "scripts" / "python_env.sh"), "ensure-venv"]
    first = _run(ensure, _env(PYTHON=base_python))
    venv_python = repo / ".venv" / "bin" / "python"
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == str(venv_python) and "creating" in first.stderr
    assert _run([str(venv_python), "-c", "import pip"], _env()).returncode == 0
    made = (repo / ".venv" / "pyvenv.cfg").stat().st_mtime_ns
    again = _run(ensure, _env(PYTHON=base_python))
    assert again.returncode == 0 and again.stdout.strip() == str(venv_python)
    assert "creating" not in again.stderr and (repo / ".venv" / "pyvenv.cfg").stat().st_mtime_ns == made


def _check(repo: Path, venv: Path) -> subprocess.CompletedProcess:
    return _run([str(venv / "bin" / "python"), str(repo / "scripts" / "install_stamp.py"), "check"], _env())


def test_stamp_skips_pip_only_while_inputs_are_unchanged(repo, user_venv):
    """The stamp lives in the environment; install.sh with a current stamp must not touch pip (this
    venv has none, so a wrong decision shows as a failure), and any input change must re-run pip."""
    py = str(user_venv / "bin" / "python")
    assert _check(repo, user_venv).returncode == 1
    assert _run([py, str(repo / "scripts" / "install_stamp.py"), "write"], _env()).returncode == 0
    assert (user_venv / "lingshu_fast-install.stamp").is_file()
    assert _check(repo, user_venv).returncode == 0
    install = _run(["bash", str(repo / "scripts" / "install.sh")], _env(PYTHON=py))
    assert install.returncode == 0 and "skipping pip" in install.stderr, install.stderr
    for name in ("setup.py", "pyproject.toml", "csrc/packing.cpp", "scripts/install.sh"):
        path = repo / name
        original = path.read_bytes()
        path.write_bytes(original + b"\n# changed\n")
        proc = _check(repo, user_venv)
        assert proc.returncode == 1 and "changed" in proc.stderr, name
        if name == "setup.py":
            install = _run(["bash", str(repo / "scripts" / "install.sh")], _env(PYTHON=py))
            assert install.returncode != 0 and "No module named pip" in install.stderr, install.stderr
        path.write_bytes(original)
        assert _check(repo, user_venv).returncode == 0, name


def test_stamp_is_stale_for_another_checkout_or_a_lost_package(repo, user_venv, tmp_path):
    """The editable install points at one checkout; a stamp also cannot see a later pip uninstall."""
    py = str(user_venv / "bin" / "python")
    assert _run([py, str(repo / "scripts" / "install_stamp.py"), "write"], _env()).returncode == 0
    other = tmp_path / "other-checkout"
    shutil.copytree(repo, other)
    proc = _check(other, user_venv)
    assert proc.returncode == 1 and "changed" in proc.stderr
    assert _run([py, str(other / "scripts" / "install_stamp.py"), "write"], _env()).returncode == 0
    proc = _check(other, user_venv)
    assert proc.returncode == 1 and "not this checkout" in proc.stderr
    assert _run([py, str(repo / "scripts" / "install_stamp.py"), "write"], _env()).returncode == 0
    shutil.rmtree(tmp_path / "site" / "torch")
    proc = _check(repo, user_venv)
    assert proc.returncode == 1 and "torch is not installed" in proc.stderr
