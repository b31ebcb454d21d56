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


def test_math_modules_do_not_import_ray_or_mlflow():
    allowed = {"distributed", "tracking.py"}
    offenders = []
    for path in (ROOT / "platform" / "debiaslab").rglob("*.py"):
        rel = path.relative_to(ROOT / "platform" / "debiaslab")
        if rel.parts[0] in allowed:
            continue
        for line in path.read_text().splitlines():
            s = line.strip()
            if s.startswith(("import ray", "from ray", "import mlflow", "from mlflow")):
                offenders.append(f"{rel}: {s}")
    assert offenders == []
