"""The NVIDIA ModelOpt NVFP4 export format, as TensorRT-LLM, vLLM (``modelopt_fp4``) and SGLang read it.

Per quantized Linear ``M``:

- ``M.weight``          uint8 [out, in/2], two E2M1 codes per byte, the even element in the low nibble
- ``M.weight_scale``    float8_e4m3fn [out, in/16], the block scales
- ``M.weight_scale_2``  float32 scalar, amax / (6 * 448): our global scale as it is
- ``M.input_scale``     float32 scalar, the calibrated input global scale (W4A4 only)

``hf_quant_config.json`` holds producer and quantization (quant_algo NVFP4 or W4A16_NVFP4, kv_cache_quant_algo,
group_size, exclude_modules: vLLM requires each key), and config.json the same as ``quantization_config`` with
quant_method modelopt (the shape of ModelOpt's own ``convert_hf_quant_config_format``).
"""

from __future__ import annotations

from typing import Any

import torch

from ckaqad_cli import __version__
from ckaqad_kernels import nvfp4_ref
from ckaqad_kernels.nvfp4_spec import BLOCK_SIZE

NAME = "modelopt"
QUANT_METHOD = "modelopt"
HF_QUANT_CONFIG = "hf_quant_config.json"
PARAMS = ("weight", "weight_scale", "weight_scale_2", "input_scale")
SCALE_SHAPE = ()
CONFIG_KEYS = ("quantization_config",)
EXTRA_FILES = (HF_QUANT_CONFIG,)
FP8_PARAMS = None
"""FP8 modules need ModelOpt's MIXED_PRECISION, which ckaqad does not write (docs/fp8.md)."""
TRANSFORMERS_LIBRARY = None
"""transformers does not load pre-quantized ModelOpt NVFP4 checkpoints."""
LIBRARY = "Model Optimizer"
QUANT_ALGO = {"w4a4": "NVFP4", "w4a16": "W4A16_NVFP4"}


def hf_quant_config(scheme: str, exclude: list[str]) -> dict[str, Any]:
    """``hf_quant_config.json``."""
    return {
        "producer": {"name": "ckaqad", "version": __version__},
        "quantization": {
            "quant_algo": QUANT_ALGO[scheme],
            "kv_cache_quant_algo": None,
            "group_size": BLOCK_SIZE,
            "exclude_modules": sorted(exclude),
        },
    }


def quantization_config(scheme: str, exclude: list[str], fp8: list[str] | None = None) -> dict[str, Any]:
    """config.json's ``quantization_config``: the same information in the shape ModelOpt's export writes (no FP8
    modules: FP8_PARAMS is None)."""
    fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": BLOCK_SIZE}
    group: dict[str, Any] = {"weights": dict(fp4), "targets": ["Linear"]}
    if scheme == "w4a4":
        group = {"input_activations": dict(fp4), **group}
    hf = hf_quant_config(scheme, exclude)
    return {
        "config_groups": {"group_0": group},
        "ignore": hf["quantization"]["exclude_modules"],
        "quant_algo": QUANT_ALGO[scheme],
        "producer": hf["producer"],
        "quant_method": QUANT_METHOD,
    }


def extra_files(scheme: str, exclude: list[str]) -> dict[str, Any]:
    """JSON files written beside config.json: ``hf_quant_config.json``."""
    return {HF_QUANT_CONFIG: hf_quant_config(scheme, exclude)}


def is_format(config: dict[str, Any]) -> bool:
    return (config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD


def scheme_of(config: dict[str, Any]) -> str:
    """"w4a4" or "w4a16" of a config.json of this format, from its quant_algo."""
    algo = (config.get("quantization_config") or {}).get("quant_algo")
    return next((scheme for scheme, name in QUANT_ALGO.items() if name == algo), "w4a16")


def store_scale(scale: torch.Tensor) -> torch.Tensor:
    """ModelOpt stores our global scale as it is, a 0-d float32 (exact)."""
    return scale.detach().to(torch.float32).reshape(())


def load_scale(stored: torch.Tensor) -> torch.Tensor:
    return stored.to(torch.float32).reshape(())


def block_divisors(block_scales: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """d = float32(s) * g, as ModelOpt's ``NVFP4QTensor.dequantize`` and our kernels compute it (exact)."""
    return nvfp4_ref.block_divisors(block_scales, load_scale(stored))
