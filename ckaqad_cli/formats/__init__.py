"""On-disk NVFP4 formats written by ``ckaqad pack``: compressed-tensors (default) and ModelOpt.

Everything format-specific lives in the format's own module, behind this protocol (what the rest of ckaqad may
use; a third format is one new module with these names plus its line in FORMATS):

Names and tensors (per quantized Linear ``M``)
    ``NAME``                  the format's name (``--format``)
    ``PARAMS``                the names of what a quantized Linear stores, in the order packed weight, block
                              scales, global scale, input scale (W4A4)
    ``SCALE_SHAPE``           the shape of the two stored scales
Scale conventions
    ``store_scale(scale)``    our global scale (amax / (6 * 448), the kernels' convention) -> the stored tensor
    ``load_scale(stored)``    the stored tensor -> the 0-d float32 a reader decodes; the stored scale is exact when
                              that equals ours (:func:`scale_is_exact`)
    ``block_divisors(block_scales, stored)``  the float32 divisor of each block as the format's readers compute it
                              (ModelOpt s * g, compressed-tensors s / G): what a decoded value is code * d of
    From these, :mod:`ckaqad_cli.formats.layout` writes and reads every format alike: ``module_specs`` (the tensors
    written for ``M``, in write order), ``encode`` (our tensors -> the stored ones), ``decode`` (the stored tensors
    -> the dense weight, through the kernels' dequantize) and ``decoded_global_scale``.
Config keys and extra files
    ``CONFIG_KEYS``           config.json keys the format reads; the first is the one written
    ``quantization_config(scheme, ignore, fp8)``  config.json's ``quantization_config`` (``fp8``: FP8 modules)
    ``FP8_PARAMS``            the names an FP8 Linear stores (codes, per-channel scales), None without FP8
    ``is_format(config)``     True for a config.json of this format
    ``scheme_of(config)``     "w4a4" or "w4a16" of a config.json of this format
    ``extra_files(scheme, ignore)``  {file name: JSON} written beside config.json
    ``EXTRA_FILES``           those files' names: any one of them alone identifies the format
Readers
    ``TRANSFORMERS_LIBRARY``  the module through which transformers loads the format quantized, or None
    ``LIBRARY``               the library that loads the checkpoint (a model card's library_name)

This package picks a format by name or by reading a directory, and decodes a whole packed directory with our own
unpacker (``models.load_packed`` builds the dense model from it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.formats import compressed_tensors, layout, modelopt
from ckaqad_cli.safetensors_io import SafetensorsSource
from ckaqad_kernels import fp8_ref

FORMATS: dict[str, ModuleType] = {compressed_tensors.NAME: compressed_tensors, modelopt.NAME: modelopt}
CONFIG_KEYS = tuple(dict.fromkeys(key for fmt in FORMATS.values() for key in fmt.CONFIG_KEYS))
"""config.json keys that describe a quantized model in any format (a dense model's config has none of them)."""


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
    for name, module in FORMATS.items():
        if any((Path(directory) / file).is_file() for file in module.EXTRA_FILES):
            return name
    return None


def scale_is_exact(fmt: ModuleType, scale: torch.Tensor) -> bool:
    """True when format ``fmt`` stores the global scale ``scale`` so that readers decode exactly ``scale``."""
    g = scale.detach().to(torch.float32).reshape(())
    return bool(layout.decoded_global_scale(fmt, g) == g)


def packed_config(config: dict[str, Any], fmt: ModuleType, scheme: str, ignore: list[str],
                  fp8: list[str] | None = None) -> dict[str, Any]:
    """config.json of a model packed in ``fmt``: ``config`` without any format's quantization keys, then ``fmt``'s
    quantization_config (in the place of a key of that name, else last)."""
    written = fmt.CONFIG_KEYS[0]
    out = {k: v for k, v in config.items() if k == written or k not in CONFIG_KEYS}
    out[written] = fmt.quantization_config(scheme, ignore, fp8)
    return out


def dense_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without any format's quantization keys: the dense model's config."""
    return {k: v for k, v in config.items() if k not in CONFIG_KEYS}


def model_dtype(config: dict[str, Any]) -> torch.dtype:
    """The dense dtype a model was saved in (config ``dtype`` / ``torch_dtype``), bfloat16 when it is not stated."""
    name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.bfloat16


def quantized_modules(fmt: ModuleType, source: SafetensorsSource) -> list[str]:
    """Modules stored packed in a directory of format ``fmt``."""
    suffix = f".{fmt.PARAMS[0]}"
    modules = [n[: -len(suffix)] for n in source.names() if n.endswith(suffix) and source.spec(n).dtype == torch.uint8]
    return [m for m in modules if f"{m}.{fmt.PARAMS[1]}" in source]


def fp8_modules(fmt: ModuleType, source: SafetensorsSource) -> list[str]:
    """Modules stored in FP8 in a directory of format ``fmt`` (E4M3 codes beside their per-channel scales)."""
    if fmt.FP8_PARAMS is None:
        return []
    codes, scales = fmt.FP8_PARAMS
    suffix = f".{codes}"
    modules = [n[: -len(suffix)] for n in source.names()
               if n.endswith(suffix) and source.spec(n).dtype == torch.float8_e4m3fn]
    return [m for m in modules if f"{m}.{scales}" in source]


def load_dequantized_state_dict(
    directory: str | os.PathLike, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """{name: dense tensor} of a packed directory, with the original model's parameter names.

    Quantized weights, NVFP4 and FP8, are decoded by our own unpacker (bit-exact to the fake-quantized weights ckaqad
    trained with); scale tensors are dropped; every other tensor is returned as stored. ``dtype`` defaults to the
    config's dtype.
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
            out[f"{module}.weight"] = layout.decode(fmt, tensors, module, dtype)
        for module in fp8_modules(fmt, source):
            codes, scales = (f"{module}.{p}" for p in fmt.FP8_PARAMS)
            scale_names.update((codes, scales))
            out[f"{module}.weight"] = fp8_ref.dequantize(source.get(codes), source.get(scales), dtype)
        for tensor_name in source.names():
            if tensor_name not in scale_names:
                out[tensor_name] = source.get(tensor_name)
    return out
