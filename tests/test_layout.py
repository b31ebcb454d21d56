"""Layout guard: platform/ is a source root, never a package that shadows the stdlib module."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_platform_dir_is_not_a_package():
    assert not (ROOT / "platform" / "__init__.py").exists()
    assert (ROOT / "platform" / "debiaslab" / "__init__.py").is_file()


def test_import_platform_from_repo_root_gives_stdlib():
    code = "import platform, sys; print(platform.__file__); print(platform.python_version())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert not out[0].startswith(str(ROOT / "platform"))
    assert out[1] == ".".join(map(str, sys.version_info[:3]))


def test_torch_imports_from_repo_root():
    # torch, ray and mlflow import the stdlib platform module; a shadowing package would break them
    code = "import torch, debiaslab; print(debiaslab.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out.endswith("platform/debiaslab/__init__.py")


def test_top_level_layout():
    for name in ["platform", "jobs", "cluster", "configs", "tests", "tests/benchmarks"]:
        assert (ROOT / name).is_dir(), name
    for name in ["pyproject.toml", "README.md", ".ci/run"]:
        assert (ROOT / name).is_file(), name


PACKAGE = ROOT / "platform" / "debiaslab"
# Layers (DESIGN.md "Dependency direction"): the math knows nothing of methods or orchestration;
# distributed/ runs what it is handed and never imports the orchestration above it.
FOUNDATION = ("diffusion", "nets", "data")
ORCHESTRATION = ("stages", "experiment", "recipes", "methods", "cli", "quickstart")
RAY_OR_MLFLOW_ALLOWED = ("distributed", "tracking")


def module_imports() -> dict[str, set[str]]:
    """{module path relative to debiaslab (e.g. "diffusion/guidance"): every module it imports,
    at any depth (function-level imports included)}, read from the source with ast."""
    import ast

    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("").as_posix()
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against the module's package
                    base = ["debiaslab", *rel.split("/")[:-1]][: len(rel.split("/")) + 1
                                                                 - node.level]
                    mod = ".".join([*base, node.module] if node.module else base)
                else:
                    mod = node.module or ""
                names.add(mod)
                names.update(f"{mod}.{a.name}" for a in node.names)
        out[rel] = names
    return out


def _top(rel: str) -> str:
    return rel.split("/")[0]


def test_only_distributed_and_tracking_import_ray_or_mlflow():
    offenders = sorted(
        f"{rel} imports {name}" for rel, names in module_imports().items()
        for name in names if name.split(".")[0] in ("ray", "mlflow")
        and _top(rel) not in RAY_OR_MLFLOW_ALLOWED)
    assert not offenders, offenders


def test_foundation_imports_no_methods_and_no_orchestration():
    forbidden = tuple(f"debiaslab.{m}" for m in (*ORCHESTRATION, "distributed", "tracking",
                                                  "training", "sweeps", "compare"))
    offenders = sorted(
        f"{rel} imports {name}" for rel, names in module_imports().items()
        if _top(rel) in FOUNDATION for name in names
        if name == "debiaslab.methods" or name.startswith(forbidden))
    assert not offenders, offenders


def test_distributed_never_imports_the_orchestration_layer():
    """The old stages <-> distributed import circle: stage functions are handed in instead."""
    forbidden = tuple(f"debiaslab.{m}" for m in ORCHESTRATION)
    offenders = sorted(
        f"{rel} imports {name}" for rel, names in module_imports().items()
        if _top(rel) == "distributed" for name in names if name.startswith(forbidden))
    assert not offenders, offenders


def test_layering_check_sees_function_level_and_relative_imports(tmp_path):
    """The guard itself must catch what it guards (a function-level import of ray)."""
    import ast

    tree = ast.parse("def f():\n    import ray\n    from ..stages import train\n")
    found = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert len(found) == 2
    names = module_imports()
    assert "debiaslab.distributed.runtime" in names["distributed/data"] or any(
        n.startswith("debiaslab.distributed") for n in names["distributed/data"])
    assert "ray" in {n.split(".")[0] for n in names["distributed/runtime"]}
