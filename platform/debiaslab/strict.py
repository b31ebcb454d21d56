"""Strict configs, the kernel every typed section uses: dataclasses from mappings with one-line
errors (:func:`from_mapping`, :func:`convert`), dotted ``a.b=c`` overrides
(:func:`apply_overrides`), YAML files (:func:`load_yaml`), the one flattener of nested keys
(:func:`flatten`) and the one "unknown ...; allowed: ..." message (:func:`unknown`).

It knows no schema: config/ (the experiment), sweeps.py (sweep files) and the guidance specs of
diffusion/guidance.py all build on it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence, Union, get_args, get_origin

import yaml

from debiaslab.errors import ConfigError
from debiaslab.registry import plugin_hint


def unknown(what: str, value: Any, allowed: Iterable[Any], *,
            none: str = "(none)") -> ConfigError:
    """The one message for a name or option that is not one of ``allowed``:
    ``<what>: unknown <value>; allowed: a, b, c``."""
    shown = ", ".join(str(a) for a in allowed) or none
    return ConfigError(f"{what}: unknown {value}; allowed: {shown}")


def check_registered(key: str, value: Any, registry: Any) -> None:
    """The one check of a configured name against a registry:
    ``<key>: unknown <kind> 'value'; allowed: a, b`` (with the plugins hint while the method
    plugins are not loaded)."""
    if value not in registry:
        error = unknown(key, f"{registry.kind} {value!r}", registry.names())
        raise ConfigError(f"{error}{plugin_hint()}")


def check_options(where: str, given: Iterable[Any], allowed: Iterable[Any], *,
                  owner: str = "", key_in_path: bool = False) -> None:
    """The one check of free-form option keys against what a component takes:
    ``<where>: unknown option(s) a, b [of <owner>]; allowed: x, y`` (``(none)`` when it takes
    none); ``key_in_path`` names the first unknown key in the path (``model.options.pool``)."""
    allowed = list(allowed)
    unknown_keys = sorted({str(k) for k in given} - {str(a) for a in allowed})
    if unknown_keys:
        path = f"{where}.{unknown_keys[0]}" if key_in_path else where
        what = f"option(s) {', '.join(unknown_keys)}" + (f" of {owner}" if owner else "")
        raise unknown(path, what, sorted(map(str, allowed)))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": value} of a nested mapping: the one rule that stage keys, resume checks and
    MLflow params share. A mapping is descended into when it is non-empty and all its keys are
    strings; anything else (lists, empty mappings, scalars) is a leaf."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value and all(isinstance(k, str) for k in value):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def convert(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp`` (dataclasses, Literal, Optional, tuple, dict, bool, int, float,
    str, Any), or a one-line ConfigError naming ``key``."""
    origin = get_origin(tp)
    if tp is Any:
        check_finite(value, key)
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_mapping(tp, value, key)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{key}: invalid value {value!r}; allowed: {', '.join(map(str, allowed))}"
            )
        return value
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(get_args(tp)):
            return None
        return convert(value, args[0], key)
    if origin is tuple:
        (item, *_rest) = get_args(tp)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(convert(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_type, value_type = get_args(tp) or (str, Any)
        out = {}
        for k, v in value.items():
            if key_type is str and not isinstance(k, str):
                raise ConfigError(f"{key}: keys must be strings, got {k!r}")
            out[k] = convert(v, value_type, f"{key}.{k}")
        return out
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "2e-3" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def check_finite(value: Any, key: str) -> None:
    """Free-form values (source and sampler options) may not hide a NaN or an infinity either."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for k, v in value.items():
            check_finite(v, f"{key}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_finite(v, f"{key}[{i}]")


def from_mapping(cls: type, raw: dict[str, Any], prefix: str = "", base: Any = None, *,
                 skip: Sequence[str] = (), also_allowed: Sequence[str] = ()) -> Any:
    """Dataclass ``cls`` from a mapping, strictly: every key must be a field (``skip``: fields
    the caller fills itself; ``also_allowed``: names the caller took out of ``raw`` first, listed
    in the error), every value must convert to the field's type. Keys not given keep ``base``'s
    values (default: the class defaults), so a nested section keeps its own defaults when only
    some of its keys are set."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    base = cls() if base is None else base
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key {full!r}; allowed: "
                              f"{', '.join([*names, *also_allowed])}{plugin_hint()}")
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            kwargs[key] = from_mapping(hints[key], value, full, base=getattr(base, key))
        else:
            kwargs[key] = convert(value, hints[key], full)
    return dataclasses.replace(base, **kwargs)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides (values parsed as YAML scalars/lists) to a nested dict."""
    out = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        path, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        set_path(out, path.strip(), value, f"override {path.strip()!r}")
    return out


def set_path(raw: dict[str, Any], path: str, value: Any, what: str | None = None) -> None:
    """Set ``a.b.c`` in a nested dict. Inside a list, a part is an index (``guidance.0.omega``)
    or the ``type`` of exactly one entry (``guidance.cfg.omega``)."""
    what = what or path
    node: Any = raw
    parts = path.split(".")
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            index = list_index(node, part, what)
            if last:
                node[index] = value
                return
            node = node[index]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{what}: {parts[depth - 1]!r} is not a section")
        if last:
            node[part] = value
            return
        node = node.setdefault(part, {})


def list_index(items: list[Any], part: str, what: str) -> int:
    if part.isdigit():
        if int(part) >= len(items):
            raise ConfigError(f"{what}: index {part} is past the end of a list of {len(items)}")
        return int(part)
    matches = [i for i, item in enumerate(items) if isinstance(item, dict)
               and item.get("type") == part]
    if len(matches) != 1:
        kinds = [str(item.get("type")) for item in items if isinstance(item, dict)]
        raise ConfigError(f"{what}: {part!r} must be a list index or the type of exactly one "
                          f"entry; entries: {', '.join(kinds) or '(none)'}")
    return matches[0]


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or bad YAML is a one-line ConfigError naming it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start}); save the config as UTF-8"
                          ) from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{p}: invalid YAML{where}") from None
    if raw is None:
        raise ConfigError(f"{p}: the config file is empty; give at least a name (or omit "
                          f"--config to use the defaults)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return raw


