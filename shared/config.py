"""Experiment files: YAML + dotted CLI overrides (`optim.lr=1e-5`) + `GTPO_` environment overrides, validated once.

Precedence, lowest first: the model's defaults, the YAML file, `GTPO_SECTION__KEY=value` environment variables,
then command-line `key=value` overrides. Values are parsed as YAML scalars (`1e-5`, `true`, `[1, 2]`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from shared.contracts import describe_validation_error

M = TypeVar("M", bound=BaseModel)
ENV_PREFIX = "GTPO_"


class ConfigError(ValueError):
    """A config file, override or value is wrong; the message names it."""


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


def parse_override(text: str) -> tuple[str, Any]:
    """`"optim.lr=1e-5"` -> `("optim.lr", 1e-05)`."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected key=value, e.g. optim.lr=1e-5")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def env_overrides(environ: Mapping[str, str]) -> list[tuple[str, Any]]:
    """`GTPO_OPTIM__LR=1e-5` -> `("optim.lr", 1e-05)`."""
    out = []
    for name, raw in sorted(environ.items()):
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            key = name[len(ENV_PREFIX) :].lower().replace("__", ".")
            out.append((key, yaml.safe_load(raw) if raw.strip() else ""))
    return out


def load_config(
    model: type[M],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    environ: Mapping[str, str] | None = None,
    env_keys: set[str] | None = None,
) -> M:
    """Build and validate `model` from a YAML file, environment and `key=value` overrides.

    Args:
        env_keys: top-level keys that environment variables may set (others are ignored, so that unrelated
            `GTPO_*` variables of other services do not break this one); None = the model's fields.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"config {path}: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path}: the top level must be a mapping")
        data = loaded
    allowed = env_keys if env_keys is not None else set(model.model_fields)
    for key, value in env_overrides(os.environ if environ is None else environ):
        if key.split(".")[0] in allowed:
            set_dotted(data, key, value)
    for text in overrides or []:
        set_dotted(data, *parse_override(text))
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"invalid {model.__name__}:\n{describe_validation_error(e)}") from e


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (what `--dry-run` prints)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
