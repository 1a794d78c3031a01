"""A config field declared once, together with its command-line flag.

The model's shape (``models/gpt/shape.py: GPTShape``) and the method (``scale_vectors/config.py:
ScaleVectorConfig``) are frozen dataclasses whose fields carry a ``Flag`` in their metadata. Everything
that used to repeat a field derives from that one declaration:

* the parser (``add_flags``): flag name, type, choices, help, parser default;
* the validation (``checked_values``, ``conditional_problems``): positive / finite numbers, flags that
  only apply with another one;
* the saved arguments of a checkpoint and their reading back (``Flag.key``, ``from_saved``);
* which fields define the model, compared on resume and conversion (``Flag.not_defining`` says why not);
* the flags that rebuild a model from saved arguments (``command_line``).

Nothing here imports torch: the command line is parsed and checked before anything heavy loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

_SAME = object()  # Flag.cli_default: the parser's default is the field's default


@dataclass(frozen=True)
class Flag:
    """How a config field appears on the command line and in a checkpoint's saved arguments.

    ``key``: the argparse dest and saved-args key (default: the field name). ``name``: the spelling on
    the command line (default: ``--`` + key with dashes); ``derived`` fields have no flag (the value is
    computed, e.g. the padded vocabulary). ``switch``: an on/off store_true flag; ``override``: the value
    overrides a preset (parser default None = keep the preset; a switch becomes a ``--x/--no-x`` pair).
    ``applies``/``needs``: a flag that means something only with another one; given anywhere else it is
    refused instead of silently ignored (its parser default is None to tell "given" from "default").
    ``cli_default``: the parser's default where it differs from the library's (with the reason).
    ``not_defining``: why two checkpoints that differ in this field still hold the same model.
    """

    help: str = ""
    key: str = ""
    name: str = ""
    group: str = "model"
    required: bool = False
    switch: bool = False
    override: bool = False
    choices: Optional[Tuple[str, ...]] = None
    applies: Optional[Callable[[Any], bool]] = None
    needs: str = ""
    cli_default: Any = _SAME
    positive: bool = False
    finite: bool = False
    derived: bool = False
    not_defining: str = ""


def declared(default: Any = dataclasses.MISSING, **flag: Any) -> Any:
    """A dataclass field with its ``Flag``: ``num_layers: int = declared(help=..., required=True)``."""
    return dataclasses.field(default=default, metadata={"flag": Flag(**flag)})


@dataclass(frozen=True)
class Declared:
    """One field of a config class with its flag, names resolved."""

    field: dataclasses.Field
    flag: Flag
    type: Any  # the resolved annotation

    @property
    def name(self) -> str:
        return self.field.name

    @property
    def key(self) -> str:
        return self.flag.key or self.field.name

    @property
    def option(self) -> str:
        return self.flag.name or "--" + self.key.replace("_", "-")

    @property
    def default(self) -> Any:
        return None if self.field.default is dataclasses.MISSING else self.field.default

    @property
    def parser_default(self) -> Any:
        if self.flag.applies is not None or self.flag.override:
            return None
        return self.default if self.flag.cli_default is _SAME else self.flag.cli_default


def fields_of(cls) -> List[Declared]:
    """The declared fields of ``cls`` in declaration order (fields without a Flag are not listed)."""
    hints = typing.get_type_hints(cls)
    return [Declared(f, f.metadata["flag"], hints[f.name]) for f in dataclasses.fields(cls) if "flag" in f.metadata]


def _scalar_type(annotation: Any) -> Any:
    """int for ``Optional[int]``, str for a ``Literal`` of strings."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return type(args[0])
    if args:
        return _scalar_type(args[0])
    return annotation


def _choices(d: Declared) -> Optional[List[str]]:
    if d.flag.choices is not None:
        return list(d.flag.choices)
    annotation = d.type
    if typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return None


def add_flags(groups: Mapping[str, Any], cls, skip: Tuple[str, ...] = ()) -> None:
    """Add every declared field of ``cls`` with a flag to the argparse group named by its ``Flag.group``."""
    for d in fields_of(cls):
        if d.flag.derived or d.name in skip:
            continue
        g = groups[d.flag.group]
        if d.flag.switch and d.flag.override:  # on/off pair over a preset
            g.add_argument(d.option, dest=d.key, action="store_true", default=None, help=d.flag.help)
            g.add_argument("--no-" + d.option[2:], dest=d.key, action="store_false", help=f"turn off {d.option}")
        elif d.flag.switch:
            if d.parser_default is not False:  # a store_true flag cannot turn a default-on switch off
                raise ValueError(f"{cls.__name__}.{d.name}: a switch needs cli_default=False (its flag turns it on)")
            g.add_argument(d.option, dest=d.key, action="store_true", help=d.flag.help)
        else:
            kwargs: Dict[str, Any] = dict(dest=d.key, help=d.flag.help)
            choices = _choices(d)
            if choices is not None:
                kwargs["choices"] = choices
            else:
                kwargs["type"] = _scalar_type(d.type)
            if d.flag.required:
                kwargs["required"] = True
            else:
                kwargs["default"] = d.parser_default
            g.add_argument(d.option, **kwargs)


class _Saved:
    """Attribute access to a saved-args dict (a missing key reads as None), for ``Flag.applies``."""

    def __init__(self, values: Mapping[str, Any]):
        self._values = values

    def __getattr__(self, name: str) -> Any:
        return self._values.get(name)


def conditional_problems(cls, args: Any) -> Iterator[str]:
    """A message for every conditional flag of ``cls`` that was given where it does not apply."""
    for d in fields_of(cls):
        if d.flag.applies is not None and getattr(args, d.key) is not None and not d.flag.applies(args):
            yield f"{d.option} only applies with {d.flag.needs}; it would be ignored here"


def fill_conditional_defaults(cls, args: argparse.Namespace) -> None:
    """After ``conditional_problems``: a conditional flag left out takes its field's default (an override
    of a preset stays None: the preset decides)."""
    for d in fields_of(cls):
        if d.flag.applies is not None and not d.flag.override and getattr(args, d.key) is None:
            setattr(args, d.key, d.default)


def value_problems(cls, args: Any) -> Iterator[str]:
    """Messages for declared numbers that are not finite / not positive."""
    for d in fields_of(cls):
        value = getattr(args, d.key, None)
        if value is None or d.flag.derived:
            continue
        if d.flag.finite and not math.isfinite(value):
            yield f"{d.option} must be a finite number, got {value}"
        if d.flag.positive and value <= 0:
            yield f"{d.option} must be positive, got {value}"


def from_saved(cls, saved: Mapping[str, Any], **given: Any) -> Dict[str, Any]:
    """The constructor keywords of ``cls`` that ``saved`` holds (under each field's key, None = absent),
    plus ``given``. Raises KeyError naming the key of a required field that is missing."""
    values = dict(given)
    for d in fields_of(cls):
        if d.name in values:
            continue
        if saved.get(d.key) is not None:
            values[d.name] = saved[d.key]
        elif d.field.default is dataclasses.MISSING:
            raise KeyError(d.key)
    return values


def to_saved(obj) -> Dict[str, Any]:
    """{key: value} of every declared field of a config instance."""
    return {d.key: getattr(obj, d.name) for d in fields_of(type(obj))}


def command_line(cls, saved: Mapping[str, Any]) -> List[str]:
    """The flags that give ``saved``'s values of ``cls``'s declared fields back to the parser: every value
    that is set, switches that are on, conditional flags only where they apply."""
    view = _Saved(saved)
    out = []
    for d in fields_of(cls):
        value = saved.get(d.key)
        if d.flag.derived or value is None:
            continue
        if d.flag.applies is not None and not d.flag.applies(view):
            continue
        if d.flag.switch and d.flag.override:
            out.append(d.option if value else "--no-" + d.option[2:])
        elif d.flag.switch:
            if value:
                out.append(d.option)
        else:
            out.append(f"{d.option} {value}")
    return out
