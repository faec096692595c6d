"""Flags built from the configuration dataclasses: every field of GlowConfig and TrainConfig has exactly one flag,
named after the field (`--n-bits`, `--batch-size`, ...), with the help text and choices that the field's metadata
carries (revglow.config_fields.option); and the flags of the commands that load a checkpoint.

Example:
    >>> from revglow.training.config import TrainConfig
    >>> parser = argparse.ArgumentParser()
    >>> names = add_dataclass_flags(parser, TrainConfig)
    >>> vars(parser.parse_args(["--batch-size", "16", "--warmup", "none"]))
    {'batch_size': 16, 'warmup': None}
"""
from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, fields
from typing import List, Sequence

from revglow.cli.values import device_name
from revglow.glow.config import GlowConfig
from revglow.training.config import DATASETS
from revglow.training.presets import PRESETS

__all__ = ["PRESET_LIST", "flag_type", "add_dataclass_flags", "add_checkpoint_flags"]

# Model flags whose default depends on --data (revglow.training.model_defaults.MODEL_DEFAULTS); --print-config shows
# the result.
_DATA_DEPENDENT = ("levels", "depth", "hidden", "n_bits")

# The presets as a flag's help lists them (train and profile take --preset).
PRESET_LIST = "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values())


def flag_type(name: str, hint):
    """argparse type for a dataclass field's type hint; Optional[...] also accepts 'none'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    optional = origin is typing.Union and type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else hint

    def convert(text: str):
        if optional and text.lower() in ("none", "off"):
            return None
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an' if base is int else 'a'} {base.__name__}"
                                             f"{' or none' if optional else ''}; got {text!r}") from None
    convert.__name__ = base.__name__
    return base, convert


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip: Sequence[str] = (),
                        data_defaults: bool = True) -> List[str]:
    """One flag per field of `cls`; only flags given on the command line appear in the namespace. With
    `data_defaults`, the help of model flags whose default depends on --data says so."""
    hints = typing.get_type_hints(cls)
    names = []
    group = parser.add_argument_group(f"{cls.__name__} options")
    for item in fields(cls):
        if item.name in skip:
            continue
        flag = "--" + item.name.replace("_", "-")
        default = item.default if item.default is not MISSING else None
        help_text = item.metadata.get("help", "")
        if data_defaults and cls is GlowConfig and item.name in _DATA_DEPENDENT:
            default = _data_dependent_default(item.name, default)
        base, convert = flag_type(item.name, hints[item.name])
        if base is bool:
            group.add_argument(flag, dest=item.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=f"{help_text} (default: {default})")
        else:
            kwargs = {"choices": item.metadata["choices"]} if "choices" in item.metadata else {}
            group.add_argument(flag, dest=item.name, type=convert, default=argparse.SUPPRESS,
                               metavar=None if kwargs else item.name.upper(),
                               help=f"{help_text} (default: {default})", **kwargs)
        names.append(item.name)
    return names


def _data_dependent_default(name: str, fallback) -> str:
    """'depends on --data: digits 2, cifar10 3, ...' for a model flag whose default MODEL_DEFAULTS sets."""
    from revglow.training.model_defaults import MODEL_DEFAULTS

    per_data = ", ".join(f"{data} {MODEL_DEFAULTS.get(data, {}).get(name, fallback)}" for data in DATASETS)
    return f"depends on --data: {per_data}"


def add_checkpoint_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of every command that loads a checkpoint (eval, sample, interpolate, manipulate)."""
    parser.add_argument("--checkpoint", required=True, metavar="PATH", help="a checkpoint.pt written by revglow train")
    parser.add_argument("--device", type=device_name, default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latents and dequantization noise")
    parser.add_argument("--no-ema", dest="ema", action="store_false",
                        help="use the raw weights even when the checkpoint has EMA weights")
    parser.add_argument("--label", type=int, default=None, help="class label, for class-conditional models")
