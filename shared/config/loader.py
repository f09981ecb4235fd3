"""Experiment files and service settings: YAML, `GTPO_*` environment variables and dotted `key=value` arguments,
validated once, with errors that name the field (and the nearest one for a typo) and never print a secret.

One loader, `load_config`, for every command and service, lowest first: the model's defaults, the YAML file, the
environment, then `key=value` arguments. The layers above the defaults are one pydantic-settings source
(`LayeredSource`); a service's settings class (shared/config/settings.py `ServiceSettings`) reads the environment through
the same source when it is built directly.

One environment scheme: each command or service has the prefix `GTPO_<NAME>__` (`command_prefix`), its keys nested
with `__`: `GTPO_TRAIN__OPTIM__LR` (`gtpo train`, `up`, `launch`), `GTPO_SFT__STEPS`, `GTPO_ROLLOUT__LMDEPLOY__TP`
(`gtpo serve rollout`), `GTPO_REWARD__WEIGHTS`, `GTPO_EVAL__K`, `GTPO_GENERATE__N`, `GTPO_STATUS__NAMESPACE`,
`GTPO_INIT_MODEL__SEED`, `GTPO_LAUNCH__NPROC_PER_NODE`. No prefix is the start of another, so no variable is
read by two commands. The names before this scheme (`GTPO_OPTIM__LR` for a trainer command, `GTPO_ROLLOUT_MODEL`
for a service) still work for one release, with a warning naming the new one (`legacy_env`).

Environment and `key=value` values are typed by the field they set: a string field (a token, a path, a name) takes
the text byte for byte; a field of numbers, booleans, lists, mappings or a section parses it as JSON, else as YAML
(`1e-5`, `true`, `[0.9, 0.99]`, `{"accuracy": 1}`); an empty value clears an optional field.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import types
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePath
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, SecretBytes, SecretStr, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

M = TypeVar("M", bound=BaseModel)
log = logging.getLogger("gtpo.config")
ENV_PREFIX = "GTPO_"
COMMANDS = ("train", "sft", "rollout", "reward", "eval", "generate", "status", "init_model", "merge_lora", "launch")
"""The commands and services that read `GTPO_<NAME>__*` variables (`command_prefix`)."""
LEGACY_SERVICE_PREFIXES = ("GTPO_ROLLOUT_", "GTPO_REWARD_")
"""The services' prefixes before `GTPO_<NAME>__` (one underscore: `GTPO_ROLLOUT_MODEL`); read with a warning."""
HIDDEN = "**********"


class ConfigError(ValueError):
    """A config file, override, environment variable or value is wrong; the message names it (never a secret)."""


def command_prefix(name: str) -> str:
    """`"init_model"` -> `"GTPO_INIT_MODEL__"`: the prefix of one command's (or service's) variables."""
    assert name in COMMANDS, name
    return f"{ENV_PREFIX}{name.upper()}__"


class CommandConfig(BaseModel):
    """Base of a command's settings: `env_prefix` names its variables (None: it reads no environment) and
    `foreign_fields` the settings of another command, refused with the reason rather than as a typo."""

    env_prefix: ClassVar[str | None] = None
    legacy_env_prefix: ClassVar[str | None] = None
    """The prefix before `GTPO_<NAME>__` (`GTPO_` for the trainer commands), read for one release with a warning."""
    foreign_fields: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _refuse_foreign(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in data:
                if name in cls.foreign_fields:
                    raise ValueError(f"{name}: {cls.foreign_fields[name]}; {cls.__name__} has no such setting")
        return data


class UnknownKey(ConfigError):
    """A dotted key names no field; `nearest` is the closest existing key, if any is close."""

    def __init__(self, key: str, model: type[BaseModel], nearest: str | None) -> None:
        self.key, self.nearest = key, nearest
        hint = f"; did you mean {nearest}?" if nearest else ""
        super().__init__(f"{key}: {model.__name__} has no such setting{hint}")


class ForeignKey(UnknownKey):
    """A dotted key names a setting of another command (`loss.beta` for `gtpo sft`); the message says whose."""

    def __init__(self, key: str, model: type[BaseModel], field: str, reason: str) -> None:
        self.key, self.nearest = key, None
        what = reason if key == field else f"{field} is {reason}"
        ConfigError.__init__(self, f"{key}: {what}; {model.__name__} has no such setting")


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
                foreign = section.foreign_fields if issubclass(section, CommandConfig) else {}
                if part in foreign:
                    raise ForeignKey(key, section, part, foreign[part])
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


def env_name(key: str, prefix: str) -> str:
    """`("optim.lr", "GTPO_TRAIN__")` -> `"GTPO_TRAIN__OPTIM__LR"`."""
    return prefix + key.upper().replace(".", "__")


def env_prefix(model: type[BaseModel]) -> str | None:
    """The prefix of `model`'s variables: a service's `env_prefix` (`GTPO_ROLLOUT__`), a command's (`GTPO_TRAIN__`),
    or None for a model that reads no environment."""
    if issubclass(model, BaseSettings):
        return model.model_config.get("env_prefix") or None
    return model.env_prefix if issubclass(model, CommandConfig) else None


def _legacy_prefix(model: type[BaseModel]) -> str | None:
    return getattr(model, "legacy_env_prefix", None)  # a ClassVar of CommandConfig and ServiceSettings


def _claimed(name: str) -> bool:
    """Whether `name` belongs to a command's prefix or a service's old one (so no older scheme reads it)."""
    return name.startswith(tuple(command_prefix(c) for c in COMMANDS)) or name.startswith(LEGACY_SERVICE_PREFIXES)


def legacy_env(model: type[BaseModel], environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of `model`'s scheme before `GTPO_<NAME>__`, renamed to the new one, each with a logged warning
    (one line on stderr, also where logging is not set up).

    A service's `GTPO_ROLLOUT_X` is `GTPO_ROLLOUT__X`. A trainer command's `GTPO_X` (legacy prefix `GTPO_`) is
    its `GTPO_TRAIN__X` / `GTPO_SFT__X` when X's first part is one of its settings and the name is no command's:
    `GTPO_OPTIM__LR` for `gtpo train`; `GTPO_ROLLOUT__GROUP_SIZE` is the rollout service's now.
    """
    old, new = _legacy_prefix(model), env_prefix(model)
    if old is None or new is None:
        return {}
    out = {}
    for name, raw in sorted(environ.items()):
        rest = name[len(old) :]
        if not name.startswith(old) or not rest or rest.startswith("_") or name.startswith(new):
            continue
        if old == ENV_PREFIX and (_claimed(name) or rest.lower().split("__")[0] not in model.model_fields):
            continue
        out[new + rest] = raw
        log.warning("%s is deprecated (read for one more release): name it %s", name, new + rest)
    return out


def env_overrides(model: type[BaseModel], environ: Mapping[str, str]) -> list[tuple[str, Any]]:
    """Typed `(dotted key, value)` pairs of the variables with `model`'s prefix (`env_prefix`), the old names
    (`legacy_env`) below the new ones: `GTPO_TRAIN__OPTIM__LR=1e-5` -> `("optim.lr", 1e-05)`,
    `GTPO_ROLLOUT__LMDEPLOY__TP=2` -> `("lmdeploy.tp", 2)`.

    Raises:
        ConfigError: a variable with the prefix that names no setting (a typo), naming it and the nearest
            variable; a value that does not parse for its field.
    """
    prefix = env_prefix(model)
    if prefix is None:
        return []
    merged = {**legacy_env(model, environ), **{k: v for k, v in environ.items() if k.startswith(prefix)}}
    out = []
    for name, raw in sorted(merged.items()):
        rest = name[len(prefix) :]
        if not name.startswith(prefix) or not rest:
            continue
        key = rest.lower().replace("__", ".")
        try:
            out.append((key, parse_value(field_type(model, key), raw)))
        except ForeignKey as e:
            raise ConfigError(f"{name}: {e}") from None
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
    """

    def __init__(
        self,
        settings_cls: type[BaseModel],
        path: str | Path | None = None,
        overrides: Iterable[str] = (),
        environ: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(settings_cls)  # type: ignore[arg-type]  # any model: only its fields are read
        self.path, self.overrides = path, list(overrides)
        self.environ = os.environ if environ is None else environ

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ builds the whole mapping

    def __call__(self) -> dict[str, Any]:
        model = self.settings_cls
        data = read_yaml(self.path) if self.path is not None else {}
        for key, value in env_overrides(model, self.environ):
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
) -> M:
    """Build and validate `model` (a trainer command's config or a service's settings): its defaults < the YAML
    file < its `GTPO_<NAME>__*` variables < `key=value` overrides (`LayeredSource`).

    Args:
        environ: the environment (None = `os.environ`); see `env_overrides`.

    Raises:
        ConfigError: one line per bad field, naming it (and the nearest one for a typo), never showing a secret.
    """
    source = LayeredSource(model, path, overrides or [], environ)
    try:
        if issubclass(model, BaseSettings):  # exactly these layers, not the class's own reading of os.environ
            return model(_build_sources=((source,), {}))
        return model.model_validate(source())
    except ValidationError as e:
        raise _invalid(model, e) from None


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (what `--dry-run` prints); secrets show as stars, URLs without passwords."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
