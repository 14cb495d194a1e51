"""On-disk NVFP4 formats written by ``ckaqad pack``: compressed-tensors (default) and ModelOpt.

Each format module has the same functions: ``quantization_config``, ``module_specs`` (the tensors written for one
quantized Linear), ``encode`` (our packed weight, block scales, global scales -> those tensors), ``decode`` (back to
the dense weight with the kernels' dequantize) and ``is_format``. This package picks one by name or by reading a
directory, and decodes a whole packed directory with our own unpacker.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.formats import compressed_tensors, modelopt
from ckaqad_cli.safetensors_io import SafetensorsSource

FORMATS: dict[str, ModuleType] = {compressed_tensors.NAME: compressed_tensors, modelopt.NAME: modelopt}
DEFAULT_FORMAT = compressed_tensors.NAME


def format_module(name: str) -> ModuleType:
    try:
        return FORMATS[name]
    except KeyError:
        raise CkaqadError(f"unknown format {name!r} (--format): use one of {', '.join(FORMATS)}") from None


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CkaqadError(f"{directory} has no config.json (not a Hugging Face model directory)") from None
    except json.JSONDecodeError as e:
        raise CkaqadError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


def detect_format(directory: str | os.PathLike) -> str | None:
    """"compressed-tensors" or "modelopt" for an NVFP4 directory of either format, else None."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    for name, module in FORMATS.items():
        if module.is_format(config):
            return name
    if (Path(directory) / modelopt.HF_QUANT_CONFIG).is_file():
        return modelopt.NAME
    return None


def model_dtype(config: dict[str, Any]) -> torch.dtype:
    """The dense dtype a model was saved in (config ``dtype`` / ``torch_dtype``), bfloat16 when it is not stated."""
    name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.bfloat16


def quantized_modules(fmt: ModuleType, source: SafetensorsSource) -> list[str]:
    """Modules stored packed in a directory of format ``fmt``."""
    suffix = f".{fmt.WEIGHT}"
    modules = [n[: -len(suffix)] for n in source.names() if n.endswith(suffix) and source.spec(n).dtype == torch.uint8]
    return [m for m in modules if f"{m}.weight_scale" in source]


def load_dequantized_state_dict(
    directory: str | os.PathLike, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """{name: dense tensor} of a packed directory, with the original model's parameter names.

    Quantized weights are decoded by our own unpacker (bit-exact to the fake-quantized weights ckaqad trained with);
    scale tensors are dropped; every other tensor is returned as stored. ``dtype`` defaults to the config's dtype.
    """
    name = detect_format(directory)
    if name is None:
        raise CkaqadError(f"{directory} is not an NVFP4 directory written in a format ckaqad reads")
    fmt = FORMATS[name]
    dtype = dtype or model_dtype(read_config(directory))
    out: dict[str, torch.Tensor] = {}
    with SafetensorsSource(directory) as source:
        modules = quantized_modules(fmt, source)
        scale_names = {f"{m}.{p}" for m in modules for p in fmt.PARAMS}
        for module in modules:
            tensors = {f"{module}.{p}": source.get(f"{module}.{p}") for p in fmt.PARAMS if f"{module}.{p}" in source}
            out[f"{module}.weight"] = fmt.decode(tensors, module, dtype)
        for tensor_name in source.names():
            if tensor_name not in scale_names:
                out[tensor_name] = source.get(tensor_name)
    return out
