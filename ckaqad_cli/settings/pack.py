"""Settings of ``ckaqad pack``: the options, their defaults and help, and their checks."""

from __future__ import annotations

from dataclasses import dataclass
import re
from pathlib import Path

from ckaqad_cli.settings import (
    FP8_HELP,
    SCALE_RULE_HELP,
    SettingError,
    check_at_least,
    check_choice,
    check_scheme,
    setting,
)
from ckaqad_kernels.nvfp4_spec import SCALE_RULES

DTYPES = ("auto", "bfloat16", "float16", "float32")
AUTO_VERIFY_MAX_BYTES = 2 * 10**9
"""--verify defaults to on for sources up to this size (it loads the student and the packed model in memory)."""


def parse_size(text: str | int) -> int:
    """Bytes from ``"5GB"``, ``"500MB"``, ``"2GiB"`` or an int (decimal units as in transformers' max_shard_size);
    at least one byte (--max-shard-size)."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", str(text).upper())
        if not m:
            raise SettingError("max_shard_size",
                               f"{text!r} is not a size: use a number of bytes or e.g. 500MB, 5GB, 2GiB")
        number, unit, binary = m.groups()
        base = 1024 if binary else 1000
        size = int(float(number) * base ** " KMGT".index(unit or " "))
    if size < 1:
        raise SettingError("max_shard_size", f"{text!r} must be at least 1 byte: use e.g. 500MB, 5GB, 2GiB")
    return size


def _path_text(value: Path | None) -> str | None:
    return None if value is None else str(value)


@dataclass
class PackConfig:
    """Options of ``ckaqad pack`` (what run.json records)."""

    model: str | None = setting(
        None, "A local HF causal-LM directory to quantize (plain PTQ). Default: the run's distilled student.",
        cli_type=Path | None, parse=_path_text,
    )
    out: str | None = setting(None, "Output directory. Default: RUN/pack/model.", cli_type=Path | None,
                              parse=_path_text)
    format: str = setting("compressed-tensors",
                          "compressed-tensors (vLLM, transformers) or modelopt (TensorRT-LLM, vLLM, SGLang).")
    scheme: str | None = setting(
        None, "w4a4 (weights and activations) or w4a16 (weights only). Default: the student's, else w4a4."
    )
    scale_rule: str | None = setting(
        None, SCALE_RULE_HELP + " mse-act calibrates on --calib-data. Default: the student's (its recipe); for "
        "--model, amax."
    )
    exclude: list[str] = setting(
        [], "Extra fnmatch globs of modules to keep in BF16 (plain PTQ only; repeatable). Default: none.", parse=list
    )
    fp8: list[str] = setting([], "Plain PTQ only (compressed-tensors format). " + FP8_HELP, parse=list)
    max_shard_size: str = setting("5GB", "Largest output shard, e.g. 500MB, 5GB.")
    calib_data: str | None = setting(
        None, "W4A4 calibration text: builtin, a .txt / .jsonl file or a datasets dir. Default: the run's distill data."
    )
    calib_tokens: int = setting(4096, "Tokens for W4A4 input calibration.")
    calib_seq_len: int = setting(256, "Calibration sequence length.")
    verify: bool | None = setting(
        None, "Load the output back and compare with the fake-quantized student. Default: on for sources up to 2 GB.",
        flags=("--verify/--no-verify",),
    )
    force: bool = setting(False, "Replace an existing output and re-run a finished stage. Default: off.")
    backend: str = setting(
        "auto", "Quantization kernels: auto (Triton on a GPU; on the CPU the C kernel where a C compiler is found, "
        "else the PyTorch reference), triton, c or torch. All write the same bytes."
    )
    device: str = setting("cpu", "Device for quantization, calibration and verify.")
    dtype: str = setting(
        "auto", "dtype of the tensors left unquantized (embeddings, norms, head) and of config.json: auto, bfloat16, "
        "float16 or float32. auto keeps the source's, except bfloat16 for a distilled student (its float32 master "
        "weights are for training)."
    )

    def __post_init__(self) -> None:
        """The checks that need no model; the format name is checked by the stage (the formats import torch)."""
        from ckaqad_kernels import dispatch  # torch: when a config is made, never for --help

        check_choice(self.dtype, DTYPES, "dtype")
        if self.scheme is not None:
            check_scheme(self.scheme)
        check_at_least(self, {"calib_tokens": 1, "calib_seq_len": 2})
        if self.scale_rule is not None:
            check_choice(self.scale_rule, SCALE_RULES, "scale_rule")
        check_choice(self.backend, dispatch.BACKENDS, "backend")
        self._check_device()
        parse_size(self.max_shard_size)

    def _check_device(self) -> None:
        import torch

        from ckaqad_kernels import dispatch, nvfp4_cpu

        try:
            device = torch.device(self.device)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise SettingError("device", f"must be cpu, cuda or cuda:N, not {self.device!r}")
        if self.backend == "triton" and device.type != "cuda" and not dispatch.triton_interpreted():
            raise SettingError("backend", "triton needs --device cuda (Triton kernels run on the GPU)")
        if self.backend == "c" and device.type != "cpu":
            raise SettingError("backend", f"c runs on the CPU; it cannot quantize on --device {self.device}")
        if self.backend == "c" and not nvfp4_cpu.available():
            raise SettingError("backend", f"c: the C kernel is not available ({nvfp4_cpu.unavailable_reason()})")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SettingError("device", f"{self.device}: no CUDA device is available")
