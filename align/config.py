"""Dataclass configs built from YAML files plus ``key=value`` overrides.

Every algorithm declares its config as a (nested) dataclass whose fields are documented with
:func:`doc`; this module turns a YAML file into an instance of it, strictly:

    @register_config("grpo")
    @dataclass
    class GRPOConfig:
        seed: int = doc(0, "Random seed for sampling and training.")
        sampler: SamplerConfig = doc(SamplerConfig(), "How rollouts are generated.")

    name, cfg = load_any_config("configs/shapes/grpo.yaml", ["sampler.num_steps=10"])
    save_config(cfg, run_dir / "config.yaml")      # the exact config the run used
    print(describe_config(GRPOConfig))             # what `align train --help` shows

Unknown keys, wrong types, values outside a ``Literal``, malformed YAML and ``ValueError``s
raised by a dataclass's ``__post_init__`` all become one-line :class:`ConfigError`s naming the
file (and line, where known) and the full dotted key, e.g.
``configs/shapes/grpo.yaml:7: train.lr: expected float, got str 'abc'``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import functools
import importlib
import os
import tempfile
import textwrap
import types
import typing
from pathlib import Path, PurePath
from typing import Any, Iterable, Literal, TypeVar, Union

import yaml

__all__ = [
    "ConfigError",
    "doc",
    "load_config",
    "load_any_config",
    "register_config",
    "config_class_for",
    "registered_configs",
    "config_to_dict",
    "save_config",
    "describe_config",
    "describe_effective_config",
    "parse_overrides",
]

T = TypeVar("T")

# The top-level YAML key naming which registered config class a file is for.
ALGORITHM_KEY = "algorithm"
# Importing this module registers every algorithm config (see `config_class_for`).
_ALL_CONFIGS_MODULE = "align.configs_all"


class ConfigError(ValueError):
    """A config file, override or value is invalid; the message is one line for the user.

    ``key`` is the full dotted key the error is about ("" for the whole file, None if unknown).
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


# --------------------------------------------------------------------------- field helper


def doc(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field with documentation (shown by :func:`describe_config`).

    ``doc(1e-4, "Learning rate.")``; mutable defaults (lists, dicts, sets, dataclass
    instances) are deep-copied per instance through a ``default_factory``; omit ``default``
    (``doc(help="...")``) for a required field. Extra keyword arguments go to
    ``dataclasses.field`` (e.g. ``default_factory=``, ``repr=``).
    """
    metadata = {**kwargs.pop("metadata", {}), "help": help}
    if default is not dataclasses.MISSING and "default_factory" in kwargs:
        raise TypeError("doc(): give either a default or default_factory, not both")
    if isinstance(default, (list, dict, set)) or (
        dataclasses.is_dataclass(default) and not isinstance(default, type)
    ):
        template = default
        kwargs["default_factory"] = lambda: copy.deepcopy(template)
    elif default is not dataclasses.MISSING:
        kwargs["default"] = default
    return dataclasses.field(metadata=metadata, **kwargs)


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type] = {}


def register_config(name: str):
    """Class decorator registering a config dataclass under ``name`` (the YAML's ``algorithm``)."""

    def decorator(cls: type[T]) -> type[T]:
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise TypeError(f"register_config({name!r}) expects a dataclass, got {cls!r}")
        previous = _REGISTRY.get(name)
        # Re-registering the same class (e.g. a module reloaded) is fine; two classes are not.
        if previous is not None and _qualname(previous) != _qualname(cls):
            raise ValueError(
                f"config name {name!r} already registered to {_qualname(previous)}, "
                f"cannot register {_qualname(cls)}"
            )
        _REGISTRY[name] = cls
        return cls

    return decorator


def registered_configs() -> dict[str, type]:
    """A copy of the registry: algorithm name -> config class."""
    _import_all_configs()
    return dict(_REGISTRY)


def config_class_for(name: str) -> type:
    """The config class registered as ``name``; ConfigError listing the registered names if none."""
    if name not in _REGISTRY:
        _import_all_configs()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown algorithm {name!r}; registered: {_registered_names()}")
    return _REGISTRY[name]


def _registered_name_of(cls: type) -> str | None:
    for name, registered in _REGISTRY.items():
        if registered is cls:
            return name
    return None


def _registered_names() -> str:
    return ", ".join(sorted(_REGISTRY)) or "(none)"


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@functools.cache
def _import_all_configs() -> None:
    # Algorithm modules register themselves on import; `align.configs_all` imports them all.
    try:
        importlib.import_module(_ALL_CONFIGS_MODULE)
    except ModuleNotFoundError as error:
        if error.name != _ALL_CONFIGS_MODULE:
            raise


# --------------------------------------------------------------------------- loading


class _Source:
    """Where values came from, to make error messages point at the right file line / override."""

    def __init__(self, label: str, lines: dict[str, int] | None = None):
        self.label = label
        self.lines = lines or {}  # dotted key -> 1-based line in the YAML file
        self.overrides: dict[str, str] = {}  # dotted key -> the override text that set it
        self.raw_overrides: dict[str, str] = {}  # dotted key -> override value before parsing

    def error(self, key: str, message: str) -> ConfigError:
        if not key:
            return ConfigError(f"{self.label}: {message}", key)
        where = self.label
        override = _lookup_prefix(self.overrides, key)
        line = None if override is not None else _lookup_prefix(self.lines, key)
        if line is not None:
            where = f"{where}:{line}"
        suffix = f" (from override {override!r})" if override is not None else ""
        return ConfigError(f"{where}: {key}: {message}{suffix}", key)


def _lookup_prefix(table: dict[str, Any], key: str) -> Any:
    """table[key], else the entry of the longest dotted/indexed prefix of key, else None."""
    while key:
        if key in table:
            return table[key]
        cut = max(key.rfind("."), key.rfind("["))
        if cut <= 0:
            return None
        key = key[:cut]
    return None


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    data: dict | None = None,
) -> T:
    """Build a ``cls`` instance from a YAML file, a dict and ``key=value`` overrides.

    Precedence: dataclass defaults < YAML file at ``path`` < ``data`` (deep-merged) <
    ``overrides`` such as ``sampler.num_steps=10`` or ``reward.names=[a,b]`` (values parsed as
    YAML). A top-level ``algorithm`` key is not a field: it is checked against the name
    ``cls`` is registered under and dropped. Raises ConfigError on any invalid input.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"load_config expects a dataclass type, got {cls!r}")
    raw, source = _read_inputs(path, data, overrides)
    if ALGORITHM_KEY in raw and ALGORITHM_KEY not in _init_fields(cls):
        algorithm = raw.pop(ALGORITHM_KEY)
        expected = _registered_name_of(cls)
        if expected is not None and algorithm != expected:
            raise source.error(
                ALGORITHM_KEY,
                f"file is for algorithm {algorithm!r} but {cls.__name__} is {expected!r}",
            )
    return _build_dataclass(cls, raw, "", source, base=None)


def load_any_config(
    path: str | Path | None, overrides: Iterable[str] = (), data: dict | None = None
) -> tuple[str, Any]:
    """Load a YAML whose top-level ``algorithm`` key names a registered config class.

    Returns ``(algorithm name, config instance)``. An ``algorithm=...`` override wins over the
    file. ConfigError (listing the registered names) if the key is missing or unknown.
    """
    raw, source = _read_inputs(path, data, overrides)
    if ALGORITHM_KEY not in raw:
        _import_all_configs()
        raise source.error(
            "", f"missing top-level {ALGORITHM_KEY!r} key; registered: {_registered_names()}"
        )
    name = raw.pop(ALGORITHM_KEY)
    if not isinstance(name, str):
        raise source.error(ALGORITHM_KEY, f"expected str, got {_describe_value(name)}")
    try:
        cls = config_class_for(name)
    except ConfigError as error:
        raise source.error(ALGORITHM_KEY, str(error)) from None
    return name, _build_dataclass(cls, raw, "", source, base=None)


def parse_overrides(overrides: Iterable[str]) -> list[tuple[str, Any, str]]:
    """Split ``key=value`` strings into ``(dotted key, YAML-parsed value, raw value)``."""
    parsed = []
    for text in overrides:
        if not isinstance(text, str) or "=" not in text:
            raise ConfigError(f"override {text!r}: expected key=value, e.g. train.lr=1e-5")
        key, raw_value = (part.strip() for part in text.split("=", 1))
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {text!r}: empty key; expected key=value")
        try:
            value = yaml.safe_load(raw_value) if raw_value else None
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigError(f"override {text!r}: malformed YAML value: {problem}") from None
        parsed.append((key, value, raw_value))
    return parsed


def _read_inputs(
    path: str | Path | None, data: dict | None, overrides: Iterable[str]
) -> tuple[dict, _Source]:
    """Merge file, data and overrides into one plain nested dict, remembering origins."""
    if isinstance(overrides, str):  # a lone "k=v" string would otherwise iterate characters
        overrides = [overrides]
    if path is not None:
        raw, source = _read_yaml(Path(path))
    else:
        raw, source = {}, _Source("<data>" if data is not None else "<overrides>")
    if data is not None:
        if not isinstance(data, dict):
            raise source.error("", f"data must be a mapping, got {type(data).__name__}")
        raw = _deep_merge(raw, data)
    for key, value, raw_value in parse_overrides(overrides):
        text = f"{key}={raw_value}"
        parts = key.split(".")
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:  # absent or `null` (e.g. an Optional sub-config): start it empty
                child = node[part] = {}
            elif not isinstance(child, dict):
                prefix = ".".join(parts[: depth + 1])
                raise ConfigError(
                    f"override {text!r}: {prefix} is {_describe_value(child)}, not a mapping",
                    key,
                )
            node = child
        node[parts[-1]] = value
        source.overrides[key] = text
        source.raw_overrides[key] = raw_value
    return raw, source


def _deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> tuple[dict, _Source]:
    label = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{label}: cannot read config: {error.strerror or error}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        context = getattr(error, "context", None)
        detail = f"{context}, {problem}" if context else problem
        where = f"{label}:{mark.line + 1}:{mark.column + 1}" if mark is not None else label
        raise ConfigError(f"{where}: malformed YAML: {detail}") from None
    source = _Source(label)
    if data is None:  # empty file (or only comments): all defaults
        return {}, source
    if not isinstance(data, dict):
        raise ConfigError(
            f"{label}: top-level YAML must be a mapping of keys to values, "
            f"got {type(data).__name__}",
            "",
        )
    _record_lines(node, "", source, label)
    return data, source


def _record_lines(node: yaml.Node, prefix: str, source: _Source, label: str) -> None:
    """Fill source.lines with the line of every mapping key; reject duplicate keys."""
    if not isinstance(node, yaml.MappingNode):
        return
    seen: set[str] = set()
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.value == "<<":
            continue
        key = f"{prefix}.{key_node.value}" if prefix else key_node.value
        line = key_node.start_mark.line + 1
        if key_node.value in seen:
            raise ConfigError(f"{label}:{line}: {key}: duplicate key", key)
        seen.add(key_node.value)
        source.lines[key] = line
        _record_lines(value_node, key, source, label)


# --------------------------------------------------------------------------- building


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except NameError as error:
        raise TypeError(
            f"cannot resolve the annotations of {_qualname(cls)} ({error}); config classes "
            "must be defined at module level so their annotations can be evaluated"
        ) from None


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _build_dataclass(cls: type, raw: Any, key: str, source: _Source, base: Any) -> Any:
    """Instance of ``cls`` from a mapping; ``base`` is the default instance to update, if any."""
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, dict):
        raise source.error(
            key, f"expected a mapping for {cls.__name__}, got {_describe_value(raw)}"
        )
    fields = _init_fields(cls)
    hints = _type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        if not isinstance(name, str):
            raise source.error(key, f"keys must be strings, got {_describe_value(name)}")
        field_key = _join(key, name)
        if name not in fields:
            raise source.error(field_key, _unknown_key_message(field_key, name, list(fields)))
        f = fields[name]
        if base is not None:
            field_base = getattr(base, name)
        else:
            field_base = _field_default(f)
        kwargs[name] = _convert(value, hints[name], field_key, source, field_base)
    if base is None:
        missing = [
            name
            for name, f in fields.items()
            if name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            keys = ", ".join(_join(key, name) for name in missing)
            raise source.error(key, f"missing required key(s): {keys}")
    try:
        # __post_init__ runs here (and again via replace) so classes validate combinations.
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as error:
        where = key or cls.__name__
        message = f"invalid {where}: {error}" if not key else f"invalid {cls.__name__}: {error}"
        raise source.error(key, message) from None


def _unknown_key_message(field_key: str, name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    if close:
        suggestion = field_key[: len(field_key) - len(name)] + close[0]
        return f"unknown key {field_key!r} (did you mean {suggestion!r}?)"
    return f"unknown key {field_key!r}; valid keys here: {', '.join(valid) or '(none)'}"


_UNION_TYPES = (Union, types.UnionType)


def _convert(value: Any, tp: Any, key: str, source: _Source, base: Any = None) -> Any:
    """Check / convert one YAML value to annotation ``tp``; ``key`` is its dotted path."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any or tp is object:
        return value
    if origin is typing.Annotated:
        return _convert(value, args[0], key, source, base)
    if origin in _UNION_TYPES:
        options = [arg for arg in args if arg is not type(None)]
        if value is None and len(options) < len(args):
            return None
        if len(options) == 1:
            option = options[0]
            try:
                return _convert(value, option, key, source, base)
            except ConfigError as error:
                # Say "expected float | None" for scalars; keep nested errors as they are.
                scalar = typing.get_origin(option) is Literal or (
                    isinstance(option, type) and not dataclasses.is_dataclass(option)
                )
                if error.key == key and scalar:
                    raise _type_error(value, tp, key, source) from None
                raise
        nested = [o for o in options if isinstance(o, type) and dataclasses.is_dataclass(o)]
        if isinstance(value, dict) and len(nested) == 1:
            return _convert(value, nested[0], key, source, base)
        for option in options:
            try:
                return _convert(value, option, key, source, base)
            except ConfigError:
                continue
        raise _type_error(value, tp, key, source)
    if origin is Literal:
        candidates = [value]
        raw = source.raw_overrides.get(key)
        if raw is not None:
            candidates.append(raw)
        for candidate in candidates:
            for allowed in args:
                if candidate == allowed and type(candidate) is type(allowed):
                    return allowed
        allowed_text = ", ".join(repr(a) for a in args)
        raise source.error(key, f"expected one of {allowed_text}, got {value!r}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, dict) and isinstance(base, tp):
            return _build_dataclass(tp, value, key, source, base)
        return _build_dataclass(tp, value, key, source, None)
    if origin in (list, set, frozenset) or tp in (list, set, frozenset):
        container = origin or tp
        if not isinstance(value, (list, tuple, set, frozenset)):
            raise _type_error(value, tp, key, source)
        item_type = args[0] if args else Any
        items = [_convert(v, item_type, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return container(items)
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise _type_error(value, tp, key, source)
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item_type = args[0] if args else Any
            return tuple(_convert(v, item_type, f"{key}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            raise source.error(
                key, f"expected {len(args)} items ({_type_name(tp)}), got {len(value)}"
            )
        return tuple(
            _convert(v, t, f"{key}[{i}]", source) for i, (v, t) in enumerate(zip(value, args))
        )
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _type_error(value, tp, key, source)
        key_type, value_type = args if args else (Any, Any)
        return {
            _convert(k, key_type, f"{key}.{k}", source): _convert(
                v, value_type, f"{key}.{k}", source
            )
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(value, tp, key, source)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(value, tp, key, source)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML follows YAML 1.1, where `1e-4` (no dot, no exponent sign) is a string.
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise _type_error(value, tp, key, source)
    if tp is str:
        if isinstance(value, str):
            return value
        # `run_name=2024` on the command line means the string "2024".
        raw = source.raw_overrides.get(key)
        if raw is not None and isinstance(value, (int, float, bool)):
            return raw
        raise _type_error(value, tp, key, source)
    if isinstance(tp, type) and issubclass(tp, PurePath):
        if isinstance(value, (str, PurePath)):
            return tp(value)
        raise _type_error(value, tp, key, source)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value is member or value == member.value or value == member.name:
                return member
        allowed_text = ", ".join(repr(m.value) for m in tp)
        raise source.error(key, f"expected one of {allowed_text}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise _type_error(value, tp, key, source)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _type_error(value, tp, key, source)
    raise TypeError(f"{key}: unsupported config annotation {tp!r}")


def _type_error(value: Any, tp: Any, key: str, source: _Source) -> ConfigError:
    return source.error(key, f"expected {_type_name(tp)}, got {_describe_value(value)}")


def _describe_value(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _type_name(tp: Any) -> str:
    """Short readable name of an annotation: `float | None`, `list[str]`, `'sde' | 'ode'`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is type(None):
        return "None"
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in _UNION_TYPES:
        return " | ".join(_type_name(arg) for arg in args)
    if origin is Literal:
        return " | ".join(repr(arg) for arg in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        inner = ", ".join("..." if arg is Ellipsis else _type_name(arg) for arg in args)
        return f"{name}[{inner}]" if args else name
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


# --------------------------------------------------------------------------- saving


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config (Paths as str, tuples/sets as lists, Enums as values)."""
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"config_to_dict expects a dataclass instance, got {cfg!r}")
    return _to_plain(cfg)


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # Only init fields: derived (init=False) fields would be unknown keys on reload.
        return {
            f.name: _to_plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.init
        }
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, enum.Enum):
        return _to_plain(value.value)
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return [_to_plain(v) for v in sorted(value, key=repr)]
    if isinstance(value, dict):
        return {_to_plain(k): _to_plain(v) for k, v in value.items()}
    return value


def save_config(cfg: Any, path: str | Path, header: str | None = None) -> Path:
    """Write ``cfg`` as YAML atomically (temp file in the same folder, then os.replace).

    A registered config gets its ``algorithm`` key first, so ``load_any_config`` reloads it;
    ``header`` (e.g. the command that ran) is written as leading ``# `` comment lines.
    """
    path = Path(path)
    data = config_to_dict(cfg)
    name = _registered_name_of(type(cfg))
    if name is not None and ALGORITHM_KEY not in data:
        data = {ALGORITHM_KEY: name, **data}
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
    if header:
        text = "".join(f"# {line}\n" for line in header.splitlines()) + text
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    return path


# --------------------------------------------------------------------------- help text


def describe_config(cls: type, width: int = 88) -> str:
    """Help text: every field as a dotted key with its type, default and documentation."""
    name = _registered_name_of(cls)
    title = f"{cls.__name__}" + (f" (algorithm: {name})" if name else "")
    lines = [f"{title}; override any field with key=value, e.g. a.b=1"]
    class_doc = (cls.__doc__ or "").strip()
    if class_doc and not class_doc.startswith(f"{cls.__name__}("):  # skip the auto signature
        lines.append(textwrap.indent(textwrap.fill(" ".join(class_doc.split()), width - 2), "  "))
    lines.append("")
    _describe_fields(cls, "", None, lines, width)
    return "\n".join(lines).rstrip() + "\n"


def _describe_fields(cls: type, prefix: str, base: Any, lines: list[str], width: int) -> None:
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = _join(prefix, f.name)
        tp = hints[f.name]
        default = getattr(base, f.name) if base is not None else _field_default(f)
        help_text = " ".join(str(f.metadata.get("help", "")).split())
        nested = _nested_dataclass(tp)
        if nested is not None:
            # An Optional sub-config defaulting to None is still configurable key by key.
            kind = nested.__name__ if default is not None else f"{_type_name(tp)}; default: null"
            lines.append(f"  {key} ({kind})")
            if help_text:
                lines.append(textwrap.indent(textwrap.fill(help_text, width - 6), "      "))
            sub_base = default if isinstance(default, nested) else None
            _describe_fields(nested, key, sub_base, lines, width)
            continue
        if default is dataclasses.MISSING:
            default_text = "required"
        else:
            default_text = f"default: {_format_default(default)}"
        lines.append(f"  {key} ({_type_name(tp)}; {default_text})")
        if help_text:
            lines.append(textwrap.indent(textwrap.fill(help_text, width - 6), "      "))


def describe_effective_config(
    cfg: Any, path: str | Path | None = None, overrides: Iterable[str] = (), resolved: Any = None
) -> str:
    """Every key of a loaded config with its effective value and where that value came from:
    ``override`` (a key=value), ``PATH:LINE`` (the YAML file) or ``default`` (the dataclass);
    a null that ``resolved`` (``cfg`` after the trainer fills its nulls, e.g. with a variant's
    paper defaults) fills shows the filled value, marked ``null -> resolved``. ``path`` and
    ``overrides`` are the ones ``cfg`` was loaded from."""
    if isinstance(overrides, str):
        overrides = [overrides]
    lines_of = _read_yaml(Path(path))[1].lines if path is not None else {}
    from_overrides: dict = {}
    for key, value, _ in parse_overrides(overrides):
        *parents, last = key.split(".")
        node = from_overrides
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[last] = value
    rows: list[tuple[str, str, str]] = []
    for key, value, filled in _effective_fields(cfg, resolved, ""):
        if _has_path(from_overrides, key.split(".")):
            origin = "override"
        elif key in lines_of:
            origin = f"{path}:{lines_of[key]}"
        else:
            origin = "default"
        rows.append((key, value, origin + ", null -> resolved" * filled))
    name = _registered_name_of(type(cfg))
    inputs = ([str(path)] if path is not None else ["defaults"]) + [f"{len(list(overrides))} override(s)"] * bool(
        from_overrides)
    header = f"{type(cfg).__name__}" + (f" (algorithm: {name})" if name else "") + f": effective values from " \
             f"{' + '.join(inputs)}"
    width = max(len(key) for key, _, _ in rows)
    body = [f"  {key:<{width}}  {value}  [{origin}]" for key, value, origin in rows]
    return "\n".join([header, *body]) + "\n"


def _effective_fields(cfg: Any, resolved: Any, prefix: str) -> list[tuple[str, str, bool]]:
    """(dotted key, value text, whether `resolved` filled a null) for every leaf field of cfg."""
    rows = []
    for f in dataclasses.fields(cfg):
        if not f.init:
            continue
        key, value = _join(prefix, f.name), getattr(cfg, f.name)
        other = getattr(resolved, f.name, None) if resolved is not None else None
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            rows += _effective_fields(value, other, key)
        elif value is None and other is not None:
            rows.append((key, _format_default(other), True))
        else:
            rows.append((key, _format_default(value), False))
    return rows


def _has_path(tree: dict, parts: list[str]) -> bool:
    for part in parts:
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def _nested_dataclass(tp: Any) -> type | None:
    """The dataclass in `Sub` or `Sub | None`, else None."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in _UNION_TYPES:
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) == 1 and isinstance(options[0], type):
            if dataclasses.is_dataclass(options[0]):
                return options[0]
    return None


def _format_default(value: Any) -> str:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = config_to_dict(value)
    else:
        value = _to_plain(value)
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix(
        "\n..."
    ).removesuffix(" ...")
