"""Method plugins, loaded at the entry points and never pulled from below.

Method modules register their components when imported: config sections, recipes, losses,
weightings, guidance, distances, nets. Nothing below ``debiaslab.methods`` imports it; instead
:func:`load` runs at every entry point:
- ``debiaslab.cli.main`` (and so ``jobs/`` and the quickstart);
- the test suite's conftest;
- every Ray worker process (Train workers, Data actors, Tune trials), as Ray's
  ``worker_process_setup_hook`` (``distributed.runtime.SETUP_HOOK``, set where the project
  starts or joins Ray).

Other packages add methods through the ``debiaslab.plugins`` entry-point group: each entry names a
module that registers its components on import, like the built-in ones. A module of one's own,
not packaged, is named in the ``DEBIASLAB_PLUGINS`` environment variable (comma-separated module
names, importable on the Python path of the driver and of the Ray workers).
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

from debiaslab.errors import ConfigError
from debiaslab.registry import mark_plugins_loaded, plugins_loaded

ENTRY_POINT_GROUP = "debiaslab.plugins"
ENV_VAR = "DEBIASLAB_PLUGINS"


def load() -> None:
    """Import the built-in methods and every installed plugin (once per process)."""
    if plugins_loaded():
        return
    import debiaslab.methods  # noqa: F401  (the built-in methods register themselves)

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            importlib.import_module(entry.value.split(":")[0])
        except ImportError as exc:
            raise ConfigError(f"plugin {entry.name!r} ({entry.value}): cannot be imported "
                              f"({exc}); install it or remove it") from None
    for name in filter(None, (n.strip() for n in os.environ.get(ENV_VAR, "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"{ENV_VAR}: module {name!r} cannot be imported ({exc}); put it "
                              f"on the Python path or remove it") from None
    mark_plugins_loaded()
