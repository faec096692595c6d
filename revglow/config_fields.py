"""Config-field helpers shared by the dataclasses (GlowConfig, TrainConfig): a field that carries its command-line
help text, and the checks that name the field an error is about."""
from __future__ import annotations

from dataclasses import field, fields
from typing import Optional, Sequence

from revglow.errors import ConfigError, ConfigTypeError

__all__ = ["option", "check_choice", "check_int", "check_bools", "check_choices", "check_known_fields"]


def option(default, help: str, choices: Optional[Sequence[str]] = None):
    """A dataclass field whose metadata carries its command-line help text (and choices, for a string option)."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return field(default=default, metadata=metadata)


def check_choice(owner: str, name: str, value, choices) -> None:
    if not isinstance(value, str):
        raise ConfigTypeError(f"{owner}.{name} must be a string, one of {choices}; got {type(value).__name__}")
    if value not in choices:
        raise ConfigError(f"{owner}.{name}={value!r} is not a known option; choose one of {choices}")


def check_int(owner: str, name: str, value, minimum: int) -> None:
    """A config field that must be an int (not a bool) of at least `minimum`; the error names `owner.name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigTypeError(f"{owner}.{name} must be an int; got {type(value).__name__}")
    if value < minimum:
        raise ConfigError(f"{owner}.{name} must be >= {minimum}; got {value}")


def check_bools(config, names: Sequence[str]) -> None:
    for name in names:
        if not isinstance(getattr(config, name), bool):
            raise ConfigTypeError(f"{type(config).__name__}.{name} must be a bool; got {type(getattr(config, name)).__name__}")


def check_choices(config) -> None:
    """Every field with `choices` in its metadata holds one of them."""
    for item in fields(config):
        if "choices" in item.metadata:
            check_choice(type(config).__name__, item.name, getattr(config, item.name), item.metadata["choices"])


def check_known_fields(cls, data: dict) -> None:
    """`cls.from_dict` refuses keys that are not fields of the dataclass `cls`, naming them."""
    unknown = set(data) - {f.name for f in fields(cls)}
    if unknown:
        raise ConfigError(f"{cls.__name__}.from_dict: unknown option(s) {sorted(unknown)}")

