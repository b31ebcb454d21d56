"""The layers of docs/architecture.md hold: every import of the package (function-level ones
included) goes to the same or a lower layer, and there is no import circle."""

from pathlib import Path

from importgraph import (
    PACKAGE,
    cycles,
    edges,
    layer_of,
    layer_table,
    modules,
    upward,
)

from debiaslab.distributed.runtime import PLUGINS_LOADER, SETUP_HOOK


def test_every_module_is_in_exactly_one_layer():
    table = layer_table()
    assert [row.number for row in table] == list(range(1, 10))
    listed = [m for row in table for m in row.modules]
    assert len(listed) == len(set(listed)), listed
    unplaced = sorted(m for m in modules() if layer_of(m, table) is None)
    assert not unplaced, f"add these modules to docs/architecture.md's layer table: {unplaced}"
    stale = sorted(m for m in listed if not any(k == m or k.startswith(m + ".")
                                                for k in modules()))
    assert not stale, f"the layer table names modules that do not exist: {stale}"


def test_no_import_runs_up_a_layer():
    offenders = upward(edges(), layer_table())
    assert not offenders, "\n".join(offenders)


def test_the_package_has_no_import_circle():
    found = cycles(edges())
    assert not found, found


def test_the_check_sees_function_level_relative_and_upward_imports(tmp_path: Path):
    """The guard catches what it guards, on a package made for the purpose."""
    pkg = tmp_path / "debiaslab"
    (pkg / "diffusion").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "diffusion" / "__init__.py").write_text("")
    (pkg / "cli.py").write_text("import debiaslab.diffusion.losses\n")
    (pkg / "diffusion" / "losses.py").write_text(
        "import math\n\ndef f():\n    from ..cli import main\n    return main\n")
    found = edges(pkg)
    assert ("diffusion.losses", "cli", 4) in {(e.source, e.target, e.line) for e in found}
    assert cycles(found) == [["cli", "diffusion.losses"]]
    (offender,) = upward(found, layer_table())
    assert "diffusion.losses (layer 2, foundation) imports cli (layer 9, entry points)" in offender
    assert offender.split(":")[1] == "4"


def test_ray_workers_load_the_plugins_module_the_entry_points_use():
    """The Ray setup hook and the plugin loader it names by path both exist; the test that the
    hook runs in real workers is in test_distributed_train."""
    import importlib

    from debiaslab import plugins

    module, _, function = SETUP_HOOK.rpartition(".")
    assert callable(getattr(importlib.import_module(module), function))
    assert importlib.import_module(PLUGINS_LOADER) is plugins and callable(plugins.load)
    assert (PACKAGE / "plugins.py").is_file()


# what a method module may import of the layers between it and the foundation: the declared
# method API (debiaslab.methods.api) re-exports config, recipes and the shared stages
METHOD_API = "methods.api"
BEHIND_THE_API = ("config", "recipes", "stages", "experiment", "records", "distributed")


def test_methods_use_the_declared_api_not_the_engine_internals():
    offenders = [f"{e.file}:{e.line}: {e.source} imports {e.target}" for e in edges()
                 if e.source.startswith("methods.") and e.source != METHOD_API
                 and e.target.split(".")[0] in BEHIND_THE_API]
    assert not offenders, "\n".join(offenders)
