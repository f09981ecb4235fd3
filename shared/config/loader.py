"""Experiment files and service settings: YAML, `GTPO_*` environment variables and dotted `key=value` arguments,
validated once, with errors that name the field (and the nearest one for a typo) and never print a secret.

One loader, `load_config`, for every command and service, lowest first: the model's defaults, the YAML file, the
environment, then `key=value` arguments. The layers above the defaults are one pydantic-settings source
(`LayeredSource`); a service's settings class (shared/config/settings.py `ServiceSettings`) reads the environment through
the same source when it is built directly. Trainer commands (`gtpo train`, `sft`, `up`, `launch`) read
`GTPO_SECTION__KEY=value` variables; each service its `GTPO_ROLLOUT_*` / `GTPO_REWARD_*` ones (its `env_prefix`).

Environment and `key=value` values are typed by the field they set: a string field (a token, a path, a name) takes
the text byte for byte; a field of numbers, booleans, lists, mappings or a section parses it as JSON, else as YAML
(`1e-5`, `true`, `[0.9, 0.99]`, `{"accuracy": 1}`); an empty value clears an optional field.
"""

from __future__ import annotations

import difflib
import json
import os
import types
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, SecretBytes, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

M = TypeVar("M", bound=BaseModel)
ENV_PREFIX = "GTPO_"
SERVICE_ENV_PREFIXES = ("GTPO_ROLLOUT_", "GTPO_REWARD_")
"""The services' variables: a trainer command leaves them alone. Its own `rollout` section is `GTPO_ROLLOUT__*`
(two underscores), and its `rollout_urls` / `reward_weights` are set in YAML or as `key=value` only."""
FOREIGN_ENV = frozenset({"GTPO_IMAGE", "GTPO_VERSION"})
"""`GTPO_*` names that no gtpo command reads (docker compose's image tag in deploy/compose.yaml)."""
HIDDEN = "**********"


class ConfigError(ValueError):
    """A config file, override, environment variable or value is wrong; the message names it (never a secret)."""


class UnknownKey(ConfigError):
    """A dotted key names no field; `nearest` is the closest existing key, if any is close."""

    def __init__(self, key: str, model: type[BaseModel], nearest: str | None) -> None:
        self.key, self.nearest = key, nearest
        hint = f"; did you mean {nearest}?" if nearest else ""
        super().__init__(f"{key}: {model.__name__} has no such setting{hint}")


# --------------------------------------------------------------------------- field types


def _members(annotation: Any) -> tuple[list[Any], bool]:
    """The members of a (possibly Optional, possibly Annotated) type, and whether None is one of them."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        args = list(get_args(annotation))
    else:
        args = [annotation]
    members = []
    for a in args:
        while get_origin(a) is Annotated:
            a = get_args(a)[0]
        members.append(a)
    return [a for a in members if a is not type(None)], type(None) in members


def _section(annotation: Any) -> type[BaseModel] | None:
    members, _ = _members(annotation)
    return next((m for m in members if isinstance(m, type) and issubclass(m, BaseModel)), None)


def _entry_type(annotation: Any, key: Any) -> Any | None:
    """The type of one entry of a mapping (any key) or of a list / tuple (an int index); None if neither."""
    for m in _members(annotation)[0]:
        origin, args = get_origin(m), get_args(m)
        if origin is dict or m is dict:
            return args[1] if len(args) == 2 else Any
        if isinstance(key, int) and origin in (list, tuple, set, frozenset):
            if origin is tuple and args and args[-1] is not Ellipsis:
                return args[key] if key < len(args) else None
            return args[0] if args else Any
    return None


def _is_text(t: Any) -> bool:
    if isinstance(t, type) and issubclass(t, (str, SecretStr, PurePath)):
        return True  # str enums too
    return get_origin(t) is Literal and all(isinstance(a, str) for a in get_args(t))


def _is_secret(annotation: Any) -> bool:
    return any(isinstance(m, type) and issubclass(m, (SecretStr, SecretBytes)) for m in _members(annotation)[0])


def _nearest(name: str, candidates: Iterable[str]) -> str | None:
    found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


def field_type(model: type[BaseModel], key: str) -> Any:
    """The annotation of dotted `key` in `model` (`"optim.lr"` -> float); entries of a mapping take its value type.

    Raises:
        UnknownKey: `key` names no field (with the nearest field of that section, when one is close).
        ConfigError: `key` goes below a value that is not a section or a mapping.
    """
    node: Any = model
    parts = key.split(".")
    for i, part in enumerate(parts):
        section = _section(node)
        if section is not None:
            if part not in section.model_fields:
                near = _nearest(part, section.model_fields)
                raise UnknownKey(key, model, ".".join([*parts[:i], near]) if near else None)
            node = section.model_fields[part].annotation
            continue
        entry = _entry_type(node, part)
        if entry is None:
            raise ConfigError(f"{key}: {'.'.join(parts[:i])} is a single value, not a section")
        node = entry
    return node


def parse_value(annotation: Any, raw: str) -> Any:
    """`raw` text as a value of a field of type `annotation` (see the module docstring).

    >>> parse_value(str, "abc #def"), parse_value(float, "1e-5"), parse_value(list[int], "[1, 2]")
    ('abc #def', 1e-05, [1, 2])
    >>> parse_value(int | None, ""), parse_value(dict[str, float], '{"accuracy": 1}')
    (None, {'accuracy': 1})
    """
    members, optional = _members(annotation)
    if optional and raw == "":
        return None
    if members and all(_is_text(m) for m in members):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        pass
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML ({getattr(e, 'problem', None) or type(e).__name__})") from None
    if isinstance(value, str) and any(_is_text(m) for m in members):
        return raw  # a text member of a union: keep the text as written, not as YAML read it
    return value


# --------------------------------------------------------------------------- sources


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `data["a"]["b"] = value` for `dotted == "a.b"`, creating levels as needed."""
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {p!r} is not a section")
        node = child
    node[leaf] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping of names; anything else is a ConfigError naming the file."""
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config {path}: cannot read it ({e.strerror if isinstance(e, OSError) else e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config {path}: not valid YAML{where} ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config {path}: the top level must be a mapping of settings")
    bad = [k for k in loaded if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"config {path}: setting names must be text, got {bad[0]!r}")
    return loaded


def typed_override(model: type[BaseModel], text: str) -> tuple[str, Any]:
    """`"optim.lr=1e-5"` -> `("optim.lr", 1e-05)`, typed by the field it sets."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep:
        raise ConfigError(f"argument {text[:60]!r}: expected key=value, e.g. optim.lr=1e-5")
    if not key:
        raise ConfigError("argument with nothing before '=': expected key=value, e.g. optim.lr=1e-5")
    try:
        return key, parse_value(field_type(model, key), raw)
    except UnknownKey:
        raise
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None


def env_name(key: str, prefix: str = ENV_PREFIX) -> str:
    """`"optim.lr"` -> `"GTPO_OPTIM__LR"`."""
    return prefix + key.upper().replace(".", "__")


def _services_variable(name: str) -> bool:
    return name in FOREIGN_ENV or any(
        name.startswith(p) and not name[len(p) :].startswith("_") for p in SERVICE_ENV_PREFIXES
    )


def env_prefix(model: type[BaseModel]) -> str:
    """The prefix of `model`'s variables: a service's `env_prefix` (`GTPO_ROLLOUT_`), else `GTPO_` (trainer)."""
    return model.model_config.get("env_prefix") or ENV_PREFIX


def env_overrides(
    model: type[BaseModel], environ: Mapping[str, str], *, siblings: Iterable[type[BaseModel]] = ()
) -> list[tuple[str, Any]]:
    """Typed `(dotted key, value)` pairs of the variables with `model`'s prefix (`env_prefix`).

    `GTPO_OPTIM__LR=1e-5` -> `("optim.lr", 1e-05)`, `GTPO_ROLLOUT_REDIS__URL=...` -> `("redis.url", ...)`. A
    trainer command leaves alone the services' variables (`SERVICE_ENV_PREFIXES`), `FOREIGN_ENV`, and variables
    naming a field of a sibling (another trainer command's config, e.g. `run_id` while `gtpo sft` runs); a service
    leaves alone names that continue its prefix with `_` (`GTPO_ROLLOUT__GROUP_SIZE`: the trainer's `rollout`).

    Raises:
        ConfigError: any other variable with the prefix that names no setting (a typo), naming it and the nearest
            variable; a value that does not parse for its field.
    """
    prefix = env_prefix(model)
    siblings = list(siblings)
    out = []
    for name, raw in sorted(environ.items()):
        rest = name[len(prefix) :]
        if not name.startswith(prefix) or not rest:
            continue
        if _services_variable(name) if prefix == ENV_PREFIX else rest.startswith("_"):
            continue
        key = rest.lower().replace("__", ".")
        top = key.split(".")[0]
        if top not in model.model_fields and any(top in s.model_fields for s in siblings):
            continue
        try:
            out.append((key, parse_value(field_type(model, key), raw)))
        except UnknownKey as e:
            hint = f"; did you mean {env_name(e.nearest, prefix)}?" if e.nearest else ""
            raise ConfigError(f"{name}: not a setting of {model.__name__} ({key}){hint}") from None
        except ConfigError as e:
            raise ConfigError(f"{name}: {e}") from None
    return out


# --------------------------------------------------------------------------- errors


def _secret_at(model: type[BaseModel], loc: tuple[Any, ...]) -> bool:
    """Whether the value at `loc` (a pydantic error location) is, or lies inside, a secret field."""
    node: Any = model
    for part in loc:
        if _is_secret(node):
            return True
        section = _section(node)
        if section is not None and isinstance(part, str) and part in section.model_fields:
            node = section.model_fields[part].annotation
            continue
        entry = _entry_type(node, part)
        if entry is not None:
            node = entry
        # else: a union member's tag (`function-after[...]`, `str`, ...): same field
    return _is_secret(node)


def _shown(value: Any) -> str:
    """` (got 0)` for a scalar; containers are never shown (a section's value holds its secrets too)."""
    if value is None or isinstance(value, (bool, int, float)):
        return f" (got {value!r})"
    if isinstance(value, str):
        return f" (got {value[:80]!r}{'...' if len(value) > 80 else ''})"
    return ""


def describe_error(err: ValidationError, model: type[BaseModel]) -> str:
    """One line per bad field: `field: message (got value)`. A secret field's value is shown as stars, a section's
    or a list's not at all; an unknown key gets the nearest field."""
    lines = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        where = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            try:
                field_type(model, where)
                detail = "unknown key"
            except UnknownKey as unknown:
                detail = f"unknown key{f'; did you mean {unknown.nearest}?' if unknown.nearest else ''}"
            except ConfigError:
                detail = "unknown key"
            lines.append(f"{where}: {detail}")
            continue
        msg = e["msg"].removeprefix("Value error, ").removeprefix(f"{where}: ")  # validators name their field too
        shown = f" (got {HIDDEN})" if _secret_at(model, loc) else _shown(e.get("input"))
        lines.append(f"{where}: {msg}{shown}" if where else msg)
    return "\n".join(lines)


def _invalid(model: type[BaseModel], err: ValidationError) -> ConfigError:
    lines = describe_error(err, model).splitlines()
    body = f" {lines[0]}" if len(lines) == 1 else "".join(f"\n  {line}" for line in lines)
    return ConfigError(f"invalid {model.__name__}:{body}")


# --------------------------------------------------------------------------- loading


class LayeredSource(PydanticBaseSettingsSource):
    """The settings above the defaults, as one pydantic-settings source: the YAML file, then the environment
    (`env_overrides`), then `key=value` arguments, each later one setting its dotted keys over the earlier ones (a
    nested section merges, a value given whole replaces the one below).

    Args:
        settings_cls: the config or settings class the values are for (it types them and names the variables).
        path: the YAML file, or None.
        overrides: `key=value` texts.
        environ: the environment (None = `os.environ`).
        siblings: the other trainer commands' configs, whose variables this one leaves alone.
    """

    def __init__(
        self,
        settings_cls: type[BaseModel],
        path: str | Path | None = None,
        overrides: Iterable[str] = (),
        environ: Mapping[str, str] | None = None,
        *,
        siblings: Iterable[type[BaseModel]] = (),
    ) -> None:
        super().__init__(settings_cls)  # type: ignore[arg-type]  # any model: only its fields are read
        self.path, self.overrides, self.siblings = path, list(overrides), tuple(siblings)
        self.environ = os.environ if environ is None else environ

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ builds the whole mapping

    def __call__(self) -> dict[str, Any]:
        model = self.settings_cls
        data = read_yaml(self.path) if self.path is not None else {}
        for key, value in env_overrides(model, self.environ, siblings=self.siblings):
            _put(model, data, key, value)
        for text in self.overrides:
            _put(model, data, *typed_override(model, text))
        return data


def _put(model: type[BaseModel], data: dict[str, Any], key: str, value: Any) -> None:
    """`set_dotted`, but a mapping given for a section merges into the section below, key by key (as
    pydantic-settings merges its sources); any other value, a mapping-typed field's included, replaces it."""
    try:
        section = isinstance(value, dict) and _section(field_type(model, key)) is not None
    except ConfigError:  # an unknown key: validation names it
        section = False
    if not section:
        set_dotted(data, key, value)
        return
    set_dotted(data, key, _data_at(data, key) if isinstance(_data_at(data, key), dict) else {})
    for k, v in value.items():
        _put(model, data, f"{key}.{k}", v)


def _data_at(data: dict[str, Any], dotted: str) -> Any:
    """`data["a"]["b"]` for `dotted == "a.b"`, None where a level is missing."""
    node: Any = data
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def load_config(
    model: type[M],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    siblings: Iterable[type[BaseModel]] = (),
) -> M:
    """Build and validate `model` (a trainer command's config or a service's settings): its defaults < the YAML
    file < its `GTPO_*` variables < `key=value` overrides (`LayeredSource`).

    Args:
        environ: the environment (None = `os.environ`); see `env_overrides`.
        siblings: the configs of the other trainer commands, whose variables this one leaves alone.

    Raises:
        ConfigError: one line per bad field, naming it (and the nearest one for a typo), never showing a secret.
    """
    source = LayeredSource(model, path, overrides or [], environ, siblings=siblings)
    try:
        if issubclass(model, BaseSettings):  # exactly these layers, not the class's own reading of os.environ
            return model(_build_sources=((source,), {}))
        return model.model_validate(source())
    except ValidationError as e:
        raise _invalid(model, e) from None


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (what `--dry-run` prints); secrets show as stars, URLs without passwords."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
