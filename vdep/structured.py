"""Turn nested dicts (parsed YAML) into typed dataclasses, and back.

Every error names the dotted key and the source it came from, and suggests the valid key the user
most likely meant. The supported field types are what configs need: bool, int, float, str, `X | None`,
`Literal[...]`, `list[...]` and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from .errors import ConfigError

_MISSING = dataclasses.MISSING


@dataclasses.dataclass
class Source:
    """Where the values of a config came from, for error messages: a file, and the keys that command-line
    overrides set (a value copied from an overridden key, as the `vdep` section into each stage, came
    from that override too)."""

    file: str
    overrides: dict[str, str] = dataclasses.field(default_factory=dict)  # dotted key → "key=value" as typed
    copies: dict[str, str] = dataclasses.field(default_factory=dict)  # dotted key → the key it was copied from

    def add_override(self, key: str, item: str) -> None:
        """`item` set `key`, replacing whatever earlier overrides set inside it."""
        for earlier in [k for k in self.overrides if k.startswith(key + ".")]:
            del self.overrides[earlier]
        self.overrides[key] = item

    def override_of(self, key: str) -> str | None:
        """The command-line override that set `key` (itself, or a mapping or list that holds it)."""
        parts = re.sub(r"\[\d+\]", "", key).split(".")
        for depth in range(len(parts), 0, -1):
            head = ".".join(parts[:depth])
            if head in self.overrides:
                return self.overrides[head]
            if head in self.copies:
                return self.override_of(".".join([self.copies[head], *parts[depth:]]))
        return None

    def where(self, key: str) -> str:
        """`'key' in FILE`, or `'key' (from the command-line override 'key=value')`."""
        if not key:
            return self.file
        override = self.override_of(key)
        if override is not None:
            return f"'{key}' (from the command-line override '{override}')"
        return f"'{key}' in {self.file}"

    def __str__(self) -> str:
        return self.file


def structure(
    cls: type, data: Any, key: str = "", source: str | Source = "config", aliases: dict[str, str] | None = None
) -> Any:
    """Build dataclass `cls` from `data` (a dict), recursively, validating keys and types.

    `aliases` maps names users bring from other tools (e.g. `learning_rate`) to ours (`lr`), for the
    "did you mean" hint of an unknown key.
    """
    return _Converter(Source(source) if isinstance(source, str) else source, aliases or {}).convert(cls, data, key)


def unstructure(obj: Any) -> Any:
    """The plain-data (YAML-ready) form of a config dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: unstructure(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [unstructure(v) for v in obj]
    if isinstance(obj, dict):
        return {k: unstructure(v) for k, v in obj.items()}
    return obj


def dotted_keys(cls: type, prefix: str = "", names: dict[str, list[str]] | None = None) -> list[str]:
    """Every valid dotted key of dataclass `cls`.

    A named mapping of dataclasses (`stages: dict[str, StageConfig]`) has no fixed keys: `names` gives
    the entries it has (`{"stages": ["align", "finetune"]}`), each expanded like a field.
    """
    keys: list[str] = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        full = f"{prefix}{f.name}"
        keys.append(full)
        inner = _dataclass_in(hints[f.name])
        if inner is not None:
            keys.extend(dotted_keys(inner, full + ".", names))
        entry = _named_mapping_of(hints[f.name])
        if entry is not None:
            for name in (names or {}).get(full, []):
                keys.append(f"{full}.{name}")
                keys.extend(dotted_keys(entry, f"{full}.{name}.", names))
    return keys


def closest_key(key: str, candidates: list[str], aliases: dict[str, str] | None = None) -> str | None:
    """The valid key a user most likely meant.

    The last component, or the name a known alias gives it, is looked for as the last component of a
    key: beside `key`, deeper under the same sections (`learning_rate` → `stages.<stage>.lr`), then
    anywhere; else the most similar key.
    """
    prefix, _, leaf = key.rpartition(".")
    prefix = prefix + "." if prefix else ""
    aliases = aliases or {}
    alias = difflib.get_close_matches(leaf, list(aliases), n=1, cutoff=0.8)
    for name in ([aliases[alias[0]]] if alias else []) + [leaf]:
        if prefix + name in candidates:
            return prefix + name
        found = _shallowest_with_leaf(name, [c for c in candidates if c.startswith(prefix)]) or _shallowest_with_leaf(
            name, candidates
        )
        if found is not None:
            return found
    matches = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if matches:
        return matches[0]
    by_leaf = {c.rsplit(".", 1)[-1]: c for c in candidates}
    leaf_matches = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
    return by_leaf[leaf_matches[0]] if leaf_matches else None


def _shallowest_with_leaf(leaf: str, candidates: list[str]) -> str | None:
    """The shortest keys ending in `leaf`; several become one pattern, a differing component written as a
    placeholder: `<stage>` under `stages` (the section's name in the singular), else `<a|b>`."""
    found = [c.split(".") for c in candidates if c.rsplit(".", 1)[-1] == leaf]
    if not found:
        return None
    depth = min(len(parts) for parts in found)
    found = [parts for parts in found if len(parts) == depth]
    pattern = []
    for index, values in enumerate(zip(*found)):
        distinct = list(dict.fromkeys(values))
        if len(distinct) == 1:
            pattern.append(distinct[0])
        elif index > 0 and pattern[index - 1].endswith("s"):
            pattern.append(f"<{pattern[index - 1][:-1]}>")
        else:
            pattern.append(f"<{'|'.join(distinct)}>")
    return ".".join(pattern)


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set `tree[a][b][c] = value` for `dotted == "a.b.c"`, creating mappings on the way."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _dataclass_in(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    if _is_union(tp):
        for arg in get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def _named_mapping_of(tp: Any) -> type | None:
    """X for a `dict[str, X]` or `dict[str, X | None]` field whose entries are dataclasses."""
    if get_origin(tp) is not dict:
        return None
    key_type, value_type = get_args(tp)
    return _dataclass_in(value_type) if key_type is str else None


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _describe(tp: Any) -> str:
    if _is_union(tp):
        return " or ".join(_describe(a) for a in get_args(tp))
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"a list of {_describe(get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


class _Converter:
    def __init__(self, source: Source, aliases: dict[str, str]):
        self.source = source
        self.aliases = aliases

    def where(self, key: str) -> str:
        return self.source.where(key)

    def convert(self, tp: Any, value: Any, key: str) -> Any:
        if dataclasses.is_dataclass(tp):
            return self.convert_dataclass(tp, value, key)
        if _is_union(tp):
            return self.convert_union(tp, value, key)
        origin = get_origin(tp)
        if origin is Literal:
            return self.convert_literal(tp, value, key)
        if origin is list:
            (item_type,) = get_args(tp)
            if item_type is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
                value = [value]  # a single path where a list of paths is expected
            if not isinstance(value, list):
                raise ConfigError(f"{self.where(key)}: expected {_describe(tp)}, got {value!r}")
            return [self.convert(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]
        if _named_mapping_of(tp) is not None:
            return self.convert_named_mapping(tp, value, key)
        if origin is dict or tp is dict:  # free-form options passed on to a library (e.g. fsspec's)
            if value is None:
                return {}
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise ConfigError(f"{self.where(key)}: expected a mapping of option names to values, got {value!r}")
            return dict(value)
        if tp in (bool, int, float, str):
            return self.convert_scalar(tp, value, key)
        if tp is Any:
            return value
        raise TypeError(f"unsupported config field type {tp!r} at {key}")  # a bug in the schema

    def convert_dataclass(self, cls: type, value: Any, key: str) -> Any:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{self.where(key)}: expected a mapping of keys to values, got {value!r}")
        hints = get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        prefix = f"{key}." if key else ""
        for name in value:
            if name not in fields:
                candidates = [prefix + k for k in dotted_keys(cls)]
                suggestion = closest_key(prefix + str(name), candidates, self.aliases)
                hint = f"; did you mean '{suggestion}'?" if suggestion else f"; valid keys here: {', '.join(fields)}"
                raise ConfigError(f"unknown key {self.where(f'{prefix}{name}')}{hint}")
        kwargs = {}
        for name, f in fields.items():
            if name in value:
                kwargs[name] = self.convert(hints[name], value[name], prefix + name)
            elif f.default is _MISSING and f.default_factory is _MISSING:  # type: ignore[misc]
                raise ConfigError(f"missing required key {self.where(prefix + name)} ({_describe(hints[name])})")
        return cls(**kwargs)

    def convert_named_mapping(self, tp: Any, value: Any, key: str) -> dict:
        """Entries in the order given (YAML mappings keep it); a null entry is dropped, so an override
        `stages.finetune=null` removes that stage."""
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{self.where(key)}: expected a mapping of names to sections, got {value!r}")
        _, value_type = get_args(tp)
        return {
            name: self.convert(value_type, entry, f"{key}.{name}") for name, entry in value.items() if entry is not None
        }

    def convert_union(self, tp: Any, value: Any, key: str) -> Any:
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        candidates = [arg for arg in args if arg is not type(None)]
        if len(candidates) == 1:  # `X | None`: X's own error is the informative one
            return self.convert(candidates[0], value, key)
        for arg in candidates:
            try:
                return self.convert(arg, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{self.where(key)}: expected {_describe(tp)}, got {value!r}")

    def convert_literal(self, tp: Any, value: Any, key: str) -> Any:
        allowed = get_args(tp)
        if value in allowed:
            return value
        hint = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(
            f"{self.where(key)}: {value!r} is not allowed; use one of " + ", ".join(repr(a) for a in allowed) + suggestion
        )

    def convert_scalar(self, tp: type, value: Any, key: str) -> Any:
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise ConfigError(f"{self.where(key)}: expected true or false, got {value!r}")
        if tp is int:
            number = _parse_float(value) if isinstance(value, str) else (float(value) if is_number else None)
            if number is not None and number.is_integer():
                return int(number)
            raise ConfigError(f"{self.where(key)}: expected an integer, got {value!r}")
        if tp is float:
            # PyYAML reads "1e-3" (no dot) as a string; accept any spelling float() accepts.
            number = _parse_float(value) if isinstance(value, str) else (float(value) if is_number else None)
            if number is not None:
                return number
            raise ConfigError(f"{self.where(key)}: expected a number, got {value!r}")
        if isinstance(value, str):
            return value
        if is_number:
            return str(value)
        raise ConfigError(f"{self.where(key)}: expected a string, got {value!r}")


def _parse_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
