"""Typer options built from a stage's settings dataclass (:mod:`ckaqad_cli.settings`), so each option is declared once.

``@with_settings(DistillConfig)`` on a command whose signature has a parameter ``cfg`` replaces that parameter with one
option per setting (its flag, type, default and help from the field) and calls the command with the settings object
built from the values. A :class:`~ckaqad_cli.settings.SettingError` raised while the command runs is shown under the
command's own flag for that setting.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Iterable
from typing import Any

import typer

from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.settings import CLI, CLI_TYPE, FLAGS, HELP, PARSE, REQUIRED, SettingError, flag_of

CONFIG_PARAMETER = "cfg"


def _fields(config: type, only: Iterable[str] | None, skip: Iterable[str]) -> list[dataclasses.Field]:
    fields = [f for f in dataclasses.fields(config) if f.metadata.get(CLI, False) and f.name not in set(skip)]
    if only is not None:
        wanted = list(only)
        fields = sorted((f for f in fields if f.name in wanted), key=lambda f: wanted.index(f.name))
    return fields


def _cli_type(field: dataclasses.Field, hints: dict[str, Any]) -> Any:
    """The option's type: declared, else the field's, with a variable-length tuple taken as a repeatable list."""
    kind = field.metadata[CLI_TYPE] or hints[field.name]
    if typing.get_origin(kind) is tuple:
        return list[typing.get_args(kind)[0]]
    return kind


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return REQUIRED  # setting(REQUIRED, ...) declares no default


def option_parameters(
    config: type, *, only: Iterable[str] | None = None, skip: Iterable[str] = ()
) -> list[inspect.Parameter]:
    """One keyword parameter (a typer option) per command-line setting of ``config``."""
    hints = typing.get_type_hints(config)
    params = []
    for field in _fields(config, only, skip):
        # no declared flags: typer's own, --name (and --no-name for a switch)
        option = typer.Option(_default(field), *field.metadata[FLAGS], help=field.metadata[HELP])
        params.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=_cli_type(field, hints)))
    return params


def settings_from(config: type, values: dict[str, Any], **fixed: Any) -> Any:
    """``config`` built from option values (each through its field's ``parse``) and ``fixed`` settings."""
    kwargs = {}
    for field in _fields(config, values, ()):
        value, parse = values[field.name], field.metadata[PARSE]
        kwargs[field.name] = parse(value) if parse is not None and value is not None else value
    return config(**kwargs, **fixed)


def flag_for(config: type, setting: str) -> str:
    """The command-line flag of ``setting`` (the first name of a ``--x/--no-x`` pair)."""
    field = next((f for f in dataclasses.fields(config) if f.name == setting), None)
    flags = field.metadata.get(FLAGS) if field is not None else None
    return flags[0].split("/")[0] if flags else flag_of(setting)


def with_settings(
    config: type,
    *,
    into: str = CONFIG_PARAMETER,
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    build: bool = True,
) -> Callable:
    """Replace the command's parameter ``into`` by ``config``'s options (``only`` those, or all but ``skip``), in
    its place.

    The command gets the settings object built from them (``build``) or the dict of their values, to build with
    more settings of its own (``pack --push-to-hub`` takes push's Hub options this way).
    """
    params = option_parameters(config, only=only, skip=skip)
    names = [p.name for p in params]

    def decorate(command: Callable) -> Callable:
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for p in inspect.signature(command, eval_str=True).parameters.values()]
        at = next(i for i, p in enumerate(own) if p.name == into)  # the options go where ``into`` was

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in names}
            try:
                return command(**kwargs, **{into: settings_from(config, values) if build else values})
            except SettingError as e:
                if e.setting not in names:  # another command's setting (the pipeline's stages): its own flag
                    raise
                raise CkaqadError(f"{flag_for(config, e.setting)} {e.problem}") from None

        signature = inspect.Signature([*own[:at], *params, *own[at + 1:]])
        wrapper.__signature__ = signature  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
        return wrapper

    return decorate
