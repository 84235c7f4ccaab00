"""One config system for every command: dataclasses + optional YAML + dotted ``key=value`` overrides.

A stage declares its keys as a dataclass (nested dataclasses give dotted keys such as ``lora.rank``);
each field's ``metadata["help"]`` is what ``samadapt <cmd> --help`` prints. Values are converted to the
field's type and checked: an unknown key is an error with a "did you mean" hint, a wrong type names the
key and the value, a ``Literal`` field lists its choices.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from samadapt.errors import UserError

T = TypeVar("T")
_NONE_WORDS = {"none", "null", "~", ""}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}

# Names users bring from other trainers, which spelling similarity would not find.
COMMON_NAMES = {"learning_rate": "lr", "epochs": "steps", "max_steps": "steps", "iterations": "steps",
                "output": "out", "output_dir": "out", "model_type": "arch", "ckpt": "checkpoint",
                "manifest": "data", "classes": "num_classes"}


def required(help: str, bounds: str | None = None) -> Any:
    """A field without default: the user must give it (``data=``, ``out=`` ...)."""
    return dataclasses.field(metadata={"help": help, "required": True, "bounds": _interval(bounds)})


def key(default: Any, help: str, bounds: str | None = None) -> Any:
    """A field with an immutable default and a one-line help text.

    ``bounds``: the range of a numeric key in interval notation, ``"[1, inf)"``, ``"(0, 1)"``: checked when
    the config is built, and shown by ``--help``. Every float key must be finite whether or not it has bounds
    (``nan <= 0`` is False, so a NaN would pass any hand-written positivity check)."""
    return dataclasses.field(default=default, metadata={"help": help, "bounds": _interval(bounds)})


_INTERVAL = re.compile(r"([\[(])\s*(-inf|[-+.\de]+)\s*,\s*(inf|[-+.\de]+)\s*([\])])")


def _interval(bounds: str | None) -> str | None:
    if bounds is not None and not _INTERVAL.fullmatch(bounds):
        raise ValueError(f"bounds {bounds!r}: write an interval like [1, inf) or (0, 1]")  # a bug in a config
    return bounds


def check_bounds(name: str, value: Any, bounds: str | None) -> None:
    """UserError unless the number ``value`` is finite (floats) and inside ``bounds`` (see :func:`key`)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{name}={value}: must be a finite number")
    if bounds is None:
        return
    opening, low, high, closing = _INTERVAL.fullmatch(bounds).groups()
    low_ok = low == "-inf" or (value > float(low) if opening == "(" else value >= float(low))
    high_ok = high == "inf" or (value < float(high) if closing == ")" else value <= float(high))
    if not (low_ok and high_ok):
        raise UserError(f"{name}={value}: must be in {bounds}")


def group(cls: type, help: str) -> Any:
    """A nested group of keys (``lora.rank``) with the group's own defaults."""
    return dataclasses.field(default_factory=cls, metadata={"help": help})


def with_defaults(cls: type, **defaults: Any) -> type:
    """The key group ``cls`` with other defaults for some keys: same names, types and help (one declaration).

    E.g. evaluation draws box prompts without jitter: ``with_defaults(PromptKeys, box_jitter=0.0)``; a required
    key given a default is optional there."""
    hints = get_type_hints(cls)
    unknown = set(defaults) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"with_defaults: {cls.__name__} has no key(s) {sorted(unknown)}")  # a bug in a stage config
    def metadata(f: dataclasses.Field) -> dict:  # a required key given a default becomes optional
        return {k: v for k, v in f.metadata.items() if not (k == "required" and f.name in defaults)}

    fields = [(f.name, hints[f.name], dataclasses.field(default=defaults.get(f.name, f.default), metadata=metadata(f)))
              for f in dataclasses.fields(cls)]
    return dataclasses.make_dataclass(cls.__name__, fields, bases=(cls,), kw_only=True)


def from_record(cls: type[T], recorded: dict[str, Any], source: str | Path) -> T:
    """Rebuild the keys of ``cls`` from a recorded config (a stage_output.json's ``config``) through the same
    builder as the CLI: keys added after the record was written get their defaults, keys ``cls`` does not have
    are ignored, every value is validated. A record that does not fit is a one-line UserError naming ``source``."""
    if not isinstance(recorded, dict):
        raise UserError(f"{source}: the recorded config is not a mapping of keys")
    known = {name for name, _ in iter_keys(cls)}
    flat = {k: v for k, v in _flatten(recorded, source=str(source)).items() if k in known}
    try:
        return build(cls, flat)
    except UserError as exc:
        raise UserError(f"{source}: recorded config does not fit this version of samadapt ({exc})") from None


def parse_config(cls: type[T], config_file: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> T:
    """Build ``cls`` from an optional YAML file and ``key=value`` overrides (overrides win)."""
    values: dict[str, Any] = {}
    if config_file:
        values.update(_flatten(read_yaml(config_file), source=str(config_file)))
    values.update(parse_overrides(overrides))
    return build(cls, values)


# A config or pipeline is a few kB: past these limits a file is a mistake or an attack (a "billion laughs"
# document whose aliases expand to 10^9 values while it is walked).
YAML_MAX_BYTES = 1 << 20
YAML_MAX_VALUES = 100_000


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with ``safe_load``; a missing, huge, non-UTF-8 or alias-bomb file or a non-mapping
    is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    if path.stat().st_size > YAML_MAX_BYTES:
        raise UserError(f"{path}: {path.stat().st_size} bytes — a config is at most {YAML_MAX_BYTES} bytes")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        _count_values(data, path)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text — save it as UTF-8") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply (or a recursive alias)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{where} ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def _count_values(data: Any, path: Path) -> None:
    """Walk ``data`` as a reader would (an alias counts each time it is reached) and stop at the limit."""
    seen = 0
    stack = [data]
    while stack:
        item = stack.pop()
        seen += 1
        if seen > YAML_MAX_VALUES:
            raise UserError(f"{path}: expands to more than {YAML_MAX_VALUES} values (aliases?) — not a config")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def parse_overrides(overrides: typing.Sequence[str]) -> dict[str, str]:
    """``["lora.rank=4", "arch=vit_b"]`` → ``{"lora.rank": "4", "arch": "vit_b"}``."""
    parsed: dict[str, str] = {}
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UserError(f"{item!r}: expected key=value (e.g. arch=vit_b)")
        parsed[name.strip()] = value
    return parsed


def build(cls: type[T], flat: dict[str, Any]) -> T:
    """Instantiate ``cls`` from a flat ``{"dotted.key": value}`` mapping, validating every key."""
    known = {name for name, _ in iter_keys(cls)}
    for name in flat:
        if name not in known:
            hint = [COMMON_NAMES[name]] if COMMON_NAMES.get(name) in known else \
                difflib.get_close_matches(name, known, n=1, cutoff=0.5)
            did_you_mean = f" — did you mean {hint[0]}=?" if hint else ""
            raise UserError(f"unknown key {name!r}{did_you_mean} (see --help for all keys)")
    return _build(cls, flat, prefix="")


def _build(cls: type, flat: dict[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        dotted = prefix + field.name
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            kwargs[field.name] = _build(kind, flat, dotted + ".")
        elif dotted in flat:
            kwargs[field.name] = convert(dotted, flat[dotted], kind)
            check_bounds(dotted, kwargs[field.name], field.metadata.get("bounds"))
        elif field.metadata.get("required"):
            raise UserError(f"missing required key {dotted}= ({field.metadata.get('help', '')})")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # __post_init__ checks of the stage config
        raise UserError(str(exc)) from None


def convert(name: str, value: Any, kind: Any) -> Any:
    """Convert a YAML value or CLI string to ``kind`` (int, float, bool, str, Path, Optional, Literal)."""
    origin = get_origin(kind)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(kind) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
            return None
        errors = []
        for option in options:
            try:
                return convert(name, value, option)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0] if len(errors) == 1 else f"{name}={value!r}: not a valid value")
    if origin is Literal:
        choices = get_args(kind)
        text = str(value).strip() if not isinstance(value, bool) else value
        if isinstance(value, bool) and value not in choices:
            # YAML 1.1 reads `no`/`off`/`yes`/`on` as booleans: give back the word the choices spell
            words = [c for c in choices if isinstance(c, str) and c.lower() in (_TRUE_WORDS if value else _FALSE_WORDS)]
            text = words[0] if words else text
        if text in choices:
            return text
        hint = difflib.get_close_matches(str(text), [str(c) for c in choices], n=1)
        extra = f" — did you mean {hint[0]}?" if hint else ""
        raise UserError(f"{name}={value!r}: must be one of {', '.join(map(str, choices))}{extra}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE_WORDS | _FALSE_WORDS:
            return text in _TRUE_WORDS
        raise UserError(f"{name}={value!r}: expected true or false")
    if kind in (int, float):
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise UserError(f"{name}={value!r}: expected {'an integer' if kind is int else 'a number'}")
        try:
            return kind(str(value).strip()) if isinstance(value, str) else kind(value)
        except ValueError:
            raise UserError(f"{name}={value!r}: expected {'an integer' if kind is int else 'a number'}") from None
    if kind is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"{name}: expected a single value, got a {type(value).__name__}")
        return str(value)
    if kind is Path:
        return Path(str(value)).expanduser()
    raise TypeError(f"config field {name} has unsupported type {kind!r}")  # a bug in a stage config


def iter_keys(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, dataclasses.Field]]:
    """Every leaf key of ``cls`` as (dotted name, field)."""
    hints = get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            yield from iter_keys(hints[field.name], prefix + field.name + ".")
        else:
            yield prefix + field.name, field


def describe(cls: type) -> str:
    """The key table ``--help`` prints: name, default (or REQUIRED), help."""
    defaults = _defaults(cls)
    lines = []
    keys = sorted(iter_keys(cls), key=lambda item: not item[1].metadata.get("required"))  # required first
    for name, field in keys:
        default = "REQUIRED" if field.metadata.get("required") else _show(defaults.get(name))
        bounds = f" (range {field.metadata['bounds']})" if field.metadata.get("bounds") else ""
        lines.append(f"  {name}={default}\n      {field.metadata.get('help', '')}{bounds}")
    return "\n".join(lines)


def to_dict(config: Any) -> dict[str, Any]:
    """A config as plain JSON-able nested dict (Paths as strings)."""
    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(config))


def _defaults(cls: type, prefix: str = "") -> dict[str, Any]:
    hints = get_type_hints(cls)
    out: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            out.update(_defaults(hints[field.name], prefix + field.name + "."))
        elif field.default is not dataclasses.MISSING:
            out[prefix + field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            out[prefix + field.name] = field.default_factory()
    return out


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _flatten(data: dict[str, Any], source: str, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in data.items():
        if not isinstance(name, str):
            raise UserError(f"{source}: key {name!r} must be a string")
        if isinstance(value, dict):
            flat.update(_flatten(value, source, prefix + name + "."))
        else:
            flat[prefix + name] = value
    return flat
