"""The compressed-tensors ``nvfp4-pack-quantized`` format, as vLLM and transformers (via compressed-tensors) read it.

Per quantized Linear ``M``:

- ``M.weight_packed``       uint8 [out, in/2], two E2M1 codes per byte, the even element in the low nibble
- ``M.weight_scale``        float8_e4m3fn [out, in/16], the block scales
- ``M.weight_global_scale`` float32 [1], the *reciprocal* of our global scale: (6 * 448) / amax
- ``M.input_global_scale``  float32 [1] (W4A4 only), the reciprocal of the calibrated input global scale

config.json carries ``quantization_config`` (quant_method compressed-tensors, one config group targeting Linear,
the ignore list, format, quantization_status compressed).
"""

from __future__ import annotations

from typing import Any

import torch

from ckaqad_cli.safetensors_io import TensorSpec
from ckaqad_kernels import nvfp4_ref
from ckaqad_kernels.nvfp4_spec import BLOCK_SIZE

NAME = "compressed-tensors"
FORMAT = "nvfp4-pack-quantized"
QUANT_METHOD = "compressed-tensors"
WEIGHT = "weight_packed"
BLOCK_SCALE = "weight_scale"
PARAMS = ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")
CONFIG_KEYS = ("quantization_config", "compression_config")
"""config.json keys read (older writers spell it compression_config); the first is the one written."""
EXTRA_FILES: tuple[str, ...] = ()
TRANSFORMERS_LIBRARY = "compressed_tensors"
"""transformers loads this format quantized when the compressed-tensors library is installed."""
LIBRARY = "transformers"


def _fp4_args(*, dynamic: bool | str) -> dict[str, Any]:
    return {
        "num_bits": 4,
        "type": "float",
        "strategy": "tensor_group",
        "group_size": BLOCK_SIZE,
        "symmetric": True,
        "dynamic": dynamic,
        "scale_dtype": "torch.float8_e4m3fn",
        "zp_dtype": "torch.float8_e4m3fn",
    }


def quantization_config(scheme: str, ignore: list[str]) -> dict[str, Any]:
    """config.json's ``quantization_config`` (the NVFP4 / NVFP4A16 presets of compressed-tensors)."""
    inputs = None
    if scheme == "w4a4":  # dynamic "local" block scales, a static stored input_global_scale
        inputs = {**_fp4_args(dynamic="local"), "observer": "static_minmax"}
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": _fp4_args(dynamic=False),
                "input_activations": inputs,
                "output_activations": None,
                "format": FORMAT,
            }
        },
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
    }


def extra_files(scheme: str, ignore: list[str]) -> dict[str, Any]:
    """JSON files written beside config.json: none (config.json says it all)."""
    return {}


def is_format(config: dict[str, Any]) -> bool:
    qc = config.get("quantization_config") or config.get("compression_config") or {}
    return qc.get("quant_method") == QUANT_METHOD and qc.get("format") == FORMAT


def scheme_of(config: dict[str, Any]) -> str:
    """"w4a4" or "w4a16" of a config.json of this format: W4A4 groups quantize their input activations."""
    qc = config.get("quantization_config") or config.get("compression_config") or {}
    groups = (qc.get("config_groups") or {}).values()
    return "w4a4" if any(isinstance(g, dict) and g.get("input_activations") for g in groups) else "w4a16"


def module_specs(module: str, out_features: int, in_features: int, scheme: str) -> list[TensorSpec]:
    """The tensors written for one quantized Linear, in write order."""
    specs = [
        TensorSpec(f"{module}.weight_packed", torch.uint8, (out_features, in_features // 2)),
        TensorSpec(f"{module}.weight_scale", torch.float8_e4m3fn, (out_features, in_features // BLOCK_SIZE)),
        TensorSpec(f"{module}.weight_global_scale", torch.float32, (1,)),
    ]
    if scheme == "w4a4":
        specs.append(TensorSpec(f"{module}.input_global_scale", torch.float32, (1,)))
    return specs


def encode(
    module: str,
    packed: torch.Tensor,
    block_scales: torch.Tensor,
    global_scale: torch.Tensor,
    input_global_scale: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """Tensors for :func:`module_specs`, from our convention (global scale = amax / (6 * 448))."""
    out = {
        f"{module}.weight_packed": packed,
        f"{module}.weight_scale": block_scales,
        f"{module}.weight_global_scale": stored_reciprocal(global_scale),
    }
    if input_global_scale is not None:
        out[f"{module}.input_global_scale"] = stored_reciprocal(input_global_scale)
    return out


def stored_reciprocal(scale: torch.Tensor) -> torch.Tensor:
    """The float32 nearest 1/scale whose own reciprocal rounds back to ``scale`` exactly, when one exists.

    Readers divide by the stored value, so this keeps decoding bit-exact. About one float32 in seven is no
    float32's rounded reciprocal; those keep the plain 1/scale (see :func:`reciprocal_is_exact`).
    """
    g = scale.detach().to(torch.float32).reshape(())
    r = 1.0 / g
    if torch.isfinite(r) and (1.0 / r) != g:
        for direction in (torch.inf, -torch.inf):
            cand = r
            for _ in range(_RECIPROCAL_SEARCH_ULPS):
                cand = torch.nextafter(cand, torch.tensor(direction))
                if (1.0 / cand) == g:
                    return cand.reshape(1)
    return r.reshape(1)


_RECIPROCAL_SEARCH_ULPS = 2


def reciprocal_is_exact(scale: torch.Tensor) -> bool:
    """True when the stored reciprocal of ``scale`` decodes back to exactly ``scale``."""
    g = scale.detach().to(torch.float32).reshape(())
    return bool(decoded_global_scale(g) == g)


def decoded_global_scale(scale: torch.Tensor) -> torch.Tensor:
    """The global scale a reader decodes from what :func:`encode` stores for ``scale``: ``scale`` itself unless it
    is one of the float32s that are no float32's rounded reciprocal (:func:`reciprocal_is_exact`)."""
    return global_scale(stored_reciprocal(scale))


def global_scale(stored: torch.Tensor) -> torch.Tensor:
    """Our global scale (0-d float32) from a stored reciprocal ``weight_global_scale`` / ``input_global_scale``."""
    return (1.0 / stored.to(torch.float32)).reshape(())


def decode(tensors: dict[str, torch.Tensor], module: str, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight of ``module`` from its packed tensors (our own unpacker, the kernels' dequantize)."""
    return nvfp4_ref.dequantize(
        tensors[f"{module}.weight_packed"],
        tensors[f"{module}.weight_scale"],
        global_scale(tensors[f"{module}.weight_global_scale"]),
        dtype=dtype,
    )
