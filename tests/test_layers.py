"""The import contract: every import of lingshu_fast's own modules points down the layers.

cli -> demo / stages -> eval, rl -> train -> plan -> model -> data -> config / answers, with kernels
and parallel at the bottom importing nothing of the package (parallel: torch and Megatron-Core only).
Function-local imports count too: hiding a cycle inside a function is still a cycle. The walk reads
the source (ast), so it sees imports a test run might never execute."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"lingshu_fast": ROOT / "lingshu_fast", "lingshu_fast.kernels": ROOT / "kernels",
           "lingshu_fast.parallel": ROOT / "parallel"}
# each layer and the layers it may import (besides itself)
BELOW = {
    "kernels": set(),
    "parallel": set(),
    "native": set(),  # lingshu_fast._C, lingshu_fast._native_check
    "config": {"parallel"},
    "answers": set(),
    "net": set(),  # standard-library HTTP with a deadline
    "data": {"config", "kernels", "parallel", "native"},
    "model": {"data", "config", "kernels", "parallel"},
    # the planner: layouts, memory and time from the model's config (train runs it at start-up)
    "plan": {"model", "data", "config", "kernels", "parallel"},
    "train": {"plan", "model", "data", "config", "kernels", "parallel"},
    "rl": {"net", "train", "plan", "model", "data", "config", "answers", "kernels", "parallel"},
    "eval": {"net", "train", "plan", "model", "data", "config", "answers", "kernels", "parallel"},
    "stages": {"net", "rl", "eval", "train", "plan", "model", "data", "config", "answers", "kernels", "parallel"},
    "demo": {"net", "stages", "rl", "eval", "train", "plan", "model", "data", "config", "answers", "kernels",
             "parallel"},
    "package": set(),
}
BELOW["cli"] = set(BELOW) - {"cli"}


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    name = parts[1]
    if name in ("_C", "_native_check"):
        return "native"
    return name


def _modules():
    for package, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("").parts
            if package == "lingshu_fast" and rel[0] in ("kernels", "parallel"):
                continue
            name = ".".join((package, *rel[:-1])) if rel[-1] == "__init__" else ".".join((package, *rel))
            yield name, path


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "lingshu_fast" and node.level == 0:
            out.extend((node.lineno, f"lingshu_fast.{alias.name}") for alias in node.names)  # submodules
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
    return [(line, m) for line, m in out if m == "lingshu_fast" or m.startswith("lingshu_fast.")]


def test_every_import_points_down():
    bad = []
    for module, path in _modules():
        mine = _layer(module)
        assert mine in BELOW, f"{module}: layer {mine!r} is not in the contract; add it to BELOW"
        for line, target in _imports(path):
            theirs = _layer(target)
            if theirs != mine and theirs not in BELOW[mine]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {mine} -> {theirs} ({target})")
    assert not bad, "imports that point up the layers:\n" + "\n".join(bad)


def test_the_contract_sees_violations(tmp_path):
    """The walk must find a function-local upward import (a check that finds nothing can't fail)."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from lingshu_fast.train.loop import train\n")
    assert _imports(src) == [(2, "lingshu_fast.train.loop")]
    assert _layer("lingshu_fast.train.loop") not in BELOW["model"]
