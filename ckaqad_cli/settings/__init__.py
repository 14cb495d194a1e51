"""The settings of every stage: one dataclass per stage (``settings/<stage>.py``), the one declaration of each option.

A field declared with :func:`setting` carries its default and its help text; the CLI builds its options from these
fields (:mod:`ckaqad_cli.cli.options`), the pipeline reuses distill's and diagnose's with :func:`same_as`, and run.json
records the dataclass. These modules import neither torch nor a stage, so ``ckaqad CMD --help`` stays fast; checks
that need torch (devices, kernels) run in the stage.

A bad value raises :class:`SettingError` naming the setting; the CLI shows it under the option's flag.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from ckaqad_cli.errors import CkaqadError

BUILTIN = "builtin"
"""The name that selects the built-in teacher (--teacher) and its task texts (--data)."""
BUILTIN_REASONER = "builtin-reasoner"
"""The name that selects the built-in reasoner (--teacher) and its worked-trace texts (--data)."""
BUILTIN_TEACHERS = (BUILTIN, BUILTIN_REASONER)
TEACHER_HELP = "Teacher: 'builtin' (the fast default), 'builtin-reasoner', a local HF directory or a hub id."
DATA_HELP = ("'builtin' (the built-in teacher's task suite: the reasoner's traces with --teacher builtin-reasoner), "
             "'builtin-reasoner', a .txt file, a .jsonl file or a saved datasets dir.")


def builtin_data(data: str, teacher: str) -> str:
    """The text source ``data`` names for ``teacher``: --data builtin means the built-in suite of the built-in teacher
    in use (the reasoner's traces under --teacher builtin-reasoner, the short task suite otherwise)."""
    return teacher if data == BUILTIN and teacher in BUILTIN_TEACHERS else data
SCHEMES = ("w4a4", "w4a16")
"""NVFP4 schemes: weights and activations (w4a4) or weights only (w4a16)."""

HELP, FLAGS, CLI, PARSE, CLI_TYPE = "help", "flags", "cli", "parse", "cli_type"
"""Keys of a setting's field metadata."""


def flag_of(name: str) -> str:
    """The flag a setting has on the command line unless it declares its own: steps -> --steps."""
    return "--" + name.replace("_", "-")


class SettingError(CkaqadError):
    """A bad value of one setting. The message names it as its flag (``--seq-len ...``); the CLI rewrites that to the
    command's own flag where the two differ (``students`` is ``--student``)."""

    def __init__(self, setting: str, problem: str):
        self.setting, self.problem = setting, problem
        super().__init__(f"{flag_of(setting)} {problem}")


REQUIRED = ...
"""The default of a setting that has none (a required option)."""


def setting(
    default: Any,
    help: str,
    *,
    flags: tuple[str, ...] = (),
    cli: bool = True,
    parse: Callable[[Any], Any] | None = None,
    cli_type: Any = None,
) -> Any:
    """A dataclass field with its help text.

    ``flags``: the option's names when not just :func:`flag_of` (e.g. ``("--run-student/--no-run-student",)``);
    ``cli=False``: not an option (set by code); ``parse``: turns the option's value into the setting's (e.g. a list of
    ``LABEL=PATH`` strings into pairs); ``cli_type``: the option's type where it is not the field's.
    """
    metadata = {HELP: help, FLAGS: flags, CLI: cli, PARSE: parse, CLI_TYPE: cli_type}
    if default is REQUIRED:
        return dataclasses.field(metadata=metadata)
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def same_as(config: type, name: str, **changes: Any) -> Any:
    """Another stage's setting reused as it is declared there (default, help, flags, parsing), ``changes`` applied."""
    source = next(f for f in dataclasses.fields(config) if f.name == name)
    meta: dict[str, Any] = {**source.metadata, **changes}
    if "default" in meta:
        default = meta.pop("default")
    elif source.default is not dataclasses.MISSING:
        default = source.default
    elif source.default_factory is not dataclasses.MISSING:
        default = source.default_factory()
    else:
        default = REQUIRED
    return setting(default, meta[HELP], flags=meta[FLAGS], cli=meta[CLI], parse=meta[PARSE], cli_type=meta[CLI_TYPE])


def check_scheme(value: str, name: str = "scheme") -> None:
    if value not in SCHEMES:
        raise SettingError(name, f"must be one of {', '.join(SCHEMES)}, not {value!r}")


CKA_PRECISIONS = ("float32", "bf16")
"""Arithmetic of the streaming CKA statistics (cka_streaming.StreamingCKA; docs/cka.md, "bf16 precision")."""
MSE_ACT_CALIBRATION_TOKENS = 4096
"""Tokens whose inputs set an mse-act student's channel weights in distill and diagnose --ptq (training text, the
diagnosed text); pack calibrates a --model on --calib-tokens."""
SCALE_RULE_HELP = (
    "How each 16-weight block's E4M3 scale is chosen: amax (the block max maps to 6), four-over-six (maps to 6 or to "
    "4, whichever errs less), mse (the least-error scale of up to 11 around those) or mse-act (mse weighted by the "
    "calibration inputs' per-channel mean square, a diagonal local Hessian). docs/nvfp4.md."
)
FP8_HELP = (
    "Glob of Linear modules quantized in FP8 instead of NVFP4 (E4M3 weights with a scale per output channel; w4a4 "
    "also quantizes their inputs per token): a plan's middle format, docs/fp8.md. Fused groups (q/k/v, gate/up) "
    "take it together; --exclude wins. Repeatable. Default: the run's plan's, else none."
)
ACTIVATION_ARITHMETIC_HELP = (
    "W4A4 input fake quantization: divide (the definition: x / scale) or reciprocal (x times reciprocals, as vLLM's "
    "and TensorRT-LLM's CUDA kernels compute it, so training sees the codes serving computes). docs/nvfp4.md."
)


def check_choice(value: Any, choices: tuple[Any, ...] | Mapping[Any, Any], name: str) -> None:
    if value not in choices:
        raise SettingError(name, f"must be one of {', '.join(map(str, choices))}, not {value!r}")


def check_at_least(config: Any, minimum: Mapping[str, float], hints: Mapping[str, str] | None = None) -> None:
    """Every named setting that is set (not None) is at least its minimum."""
    for name, least in minimum.items():
        value = getattr(config, name)
        if value is not None and value < least:
            hint = (hints or {}).get(name, "")
            raise SettingError(name, f"must be at least {least:g}{hint}, got {value}")


def check_not_negative(config: Any, names: tuple[str, ...], hints: Mapping[str, str] | None = None) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and value < 0:
            raise SettingError(name, f"must be >= 0{(hints or {}).get(name, '')}, got {value}")


def check_positive(config: Any, names: tuple[str, ...]) -> None:
    """Every named setting that is set is > 0 (a real number: a learning rate, a temperature)."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not value > 0:
            raise SettingError(name, f"must be > 0, got {value}")
