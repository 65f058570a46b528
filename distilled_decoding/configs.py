"""Configuration dataclasses: one generic validator, YAML files and ``key=value`` overrides, command-line errors.

Every config dataclass derives from :class:`ValidatedConfig`: when an instance is created, each field is checked
against its type hint (``int``, ``float``, ``str``, ``bool``, ``X | None``, ``tuple[int, ...]``,
``tuple[int, int]``, ``dict[str, Any]``, nested config dataclasses, ``Literal[...]``) — so a new field is
covered by adding it with its type — and normalised (a YAML list becomes a tuple, an int a float where a float is
expected, a path a string). Floats must be finite. A class adds its range checks in ``validate()``.

:func:`read_config_file` and :func:`parse_overrides` turn a YAML file and ``section.key=value`` strings into a
nested dict; :func:`build_config` makes the dataclass and prefixes errors with the section. Every problem is a
:class:`ConfigError` with a one-line message naming the field, the value and what was expected, and
:func:`command_line_errors` turns it into that one line on stderr and exit code 2 (no traceback).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "ConfigError",
    "ValidatedConfig",
    "check_fields",
    "build_config",
    "read_config_file",
    "parse_overrides",
    "merge",
    "command_line_errors",
]


class ConfigError(ValueError):
    """A configuration value, file or override is invalid (one-line message naming the field)."""

    def prefixed(self, section: str) -> ConfigError:
        return ConfigError(f"{section}.{self}")


class _Mismatch(Exception):
    pass


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return "anything"
    if hint is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s (e.g. [a, b])"
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    if origin in (list, Sequence):
        return f"a list of {_describe(args[0]) if args else 'values'}"
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return "a mapping"
    if dataclasses.is_dataclass(hint):
        return f"a {hint.__name__} or a mapping of its fields"
    return {int: "an int", float: "a finite number", str: "a string", bool: "true or false"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def _coerce(value: Any, hint: Any) -> Any:
    """``value`` checked against ``hint`` and normalised; raises _Mismatch."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin in (typing.Union, types.UnionType):
        ordered = sorted(args, key=lambda a: a is not type(None) if value is None else a is type(None))
        for arm in ordered:
            with contextlib.suppress(_Mismatch):
                return _coerce(value, arm)
        raise _Mismatch
    if origin is typing.Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _Mismatch
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
        raise _Mismatch
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise _Mismatch
    if origin is tuple or hint is tuple:
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
            raise _Mismatch
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    if origin in (list, Sequence) or hint is list:
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
            raise _Mismatch
        return [_coerce(v, args[0]) for v in value] if args else list(value)
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _Mismatch
        if not args:
            return dict(value)
        return {_coerce(k, args[0]): _coerce(v, args[1]) for k, v in value.items()}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping):
            return build_config(hint, value)  # a nested section given as a mapping
        raise _Mismatch
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise _Mismatch
    raise TypeError(f"config validation: unsupported type hint {hint!r}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_fields(obj: Any) -> None:
    """Check and normalise every field of the dataclass instance ``obj`` against its type hint."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value = getattr(obj, f.name)
        try:
            new = _coerce(value, hints[f.name])
        except ConfigError as e:  # a nested config section
            raise e.prefixed(f.name) from None
        except _Mismatch:
            raise ConfigError(f"{f.name}={_show(value)}: expected {_describe(hints[f.name])}") from None
        if new is not value:
            object.__setattr__(obj, f.name, new)


class ValidatedConfig:
    """Base of the config dataclasses: fields type-checked from their hints, then ``validate()`` (ranges)."""

    def __post_init__(self) -> None:
        check_fields(self)
        self.validate()

    def validate(self) -> None:
        """Range and consistency checks of one config (raise :class:`ConfigError` naming the field)."""

    @staticmethod
    def require(ok: bool, field: str, value: Any, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{field}={_show(value)}: expected {expected}")


def build_config(cls: type, values: Any, section: str | None = None) -> Any:
    """``cls(**values)`` with unknown fields and every invalid value reported as one :class:`ConfigError`
    prefixed by ``section``."""
    if not isinstance(values, Mapping):
        where = f"{section}: " if section else ""
        raise ConfigError(f"{where}expected a mapping of {cls.__name__} fields, got {_show(values)}")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        what = f"{section}: unknown field(s)" if section else "unknown config field(s)"
        raise ConfigError(f"{what} {unknown}; expected some of {sorted(names)}")
    try:
        return cls(**values)
    except ConfigError as e:
        raise (e.prefixed(section) if section else e) from None
    except (ValueError, TypeError) as e:
        msg = " ".join(str(e).split())
        raise ConfigError(f"{section}.{msg}" if section else msg) from None


def yaml_load(text: str) -> Any:
    """``yaml.safe_load`` that also reads exponent floats without a dot (``1e-4``, ``1e-06`` as JSON writes them) as
    floats — YAML 1.2's rule; PyYAML's 1.1 resolver reads them as strings."""
    import yaml

    global _LOADER
    if _LOADER is None:

        class Loader(yaml.SafeLoader):
            pass

        Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
        _LOADER = Loader
    return yaml.load(text, Loader=_LOADER)  # noqa: S506 - a SafeLoader subclass


_LOADER: Any = None
_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$")  # the exponent floats YAML 1.1 leaves as strings


def read_config_file(path: str | os.PathLike, what: str = "--config") -> dict[str, Any]:
    """A YAML (or JSON) file holding a mapping; missing, unreadable or non-YAML files are :class:`ConfigError`."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what}: {path} does not exist (or is not a file)")
    try:
        data = yaml_load(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what}: {path} cannot be read ({type(e).__name__})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"{what}: {path} is not valid YAML ({problem}{where})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: {path} holds {type(data).__name__}, expected a mapping of config fields")
    return data


def parse_overrides(items: Sequence[str], data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML; ``--key`` and dashes allowed) to ``data``."""
    import yaml

    data = {} if data is None else data
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value (e.g. distill.max_steps=500)")
        key, raw = item.split("=", 1)
        parts = key.strip().lstrip("-").replace("-", "_").split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key")
        try:
            value = yaml_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML") from None
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = value
    return data


def merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Section-wise merge: mapping values are merged one level deep, other values replaced."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


@contextlib.contextmanager
def command_line_errors(prog: str) -> Iterator[None]:
    """For command-line entry points: a :class:`ConfigError` prints ``prog: error: <message>`` and exits with
    code 2; the toolkit's other input errors (corrupt or foreign folders, a held lock, a settings change, a
    checkpoint that does not fit) print their message and exit with code 1 — no traceback for either."""
    from distilled_decoding.checkpoints import CheckpointError
    from distilled_decoding.fileio import JobLockError
    from distilled_decoding.manifest import TrajectoryError
    from distilled_decoding.training_state import TrainingStateError

    try:
        yield
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (TrajectoryError, JobLockError, CheckpointError, TrainingStateError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
