"""Name -> component registries filled by decorators (no if/elif ladders, no globals() lookups)."""

from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, TypeVar

from debiaslab.errors import ConfigError

T = TypeVar("T")

# Method modules fill the registries when they are imported; debiaslab.plugins.load() imports
# them at every entry point (CLI, jobs, tests, each Ray worker) and marks it here, so that a miss
# before that can say why instead of listing only the built-in names.
_PLUGINS = {"loaded": False}


def mark_plugins_loaded() -> None:
    _PLUGINS["loaded"] = True


def plugins_loaded() -> bool:
    return _PLUGINS["loaded"]


def plugin_hint() -> str:
    """The suffix of "unknown name" errors while the method plugins are not loaded."""
    if _PLUGINS["loaded"]:
        return ""
    return " (method plugins are not loaded: call debiaslab.plugins.load() first)"


class Registry(Generic[T]):
    """A named mapping from config strings to classes or functions.

    >>> SAMPLERS = Registry("sampler")
    >>> @SAMPLERS.register("ddim")
    ... def ddim(...): ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; allowed: {', '.join(sorted(self._items))}"
                f"{plugin_hint()}") from None

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)  # type: ignore[operator]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
