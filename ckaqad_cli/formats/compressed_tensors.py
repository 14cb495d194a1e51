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

from ckaqad_kernels.nvfp4_spec import BLOCK_SIZE

NAME = "compressed-tensors"
FORMAT = "nvfp4-pack-quantized"
QUANT_METHOD = "compressed-tensors"
PARAMS = ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")
SCALE_SHAPE = (1,)
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


def store_scale(scale: torch.Tensor) -> torch.Tensor:
    """The float32 nearest 1/scale whose own reciprocal rounds back to ``scale`` exactly, when one exists.

    About one float32 in seven is no float32's rounded reciprocal; those keep the plain 1/scale
    (``formats.scale_is_exact`` is False for them). Readers divide block scales by the stored value
    (:func:`block_divisors`), which can still differ from our s * g by one float32 step.
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


def load_scale(stored: torch.Tensor) -> torch.Tensor:
    """Our global scale (0-d float32) from a stored reciprocal ``weight_global_scale`` / ``input_global_scale``."""
    return (1.0 / stored.to(torch.float32)).reshape(())


def block_divisors(block_scales: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """d = float32(s) / G, as readers decode: compressed-tensors' ``_dequantize`` (``scale / global_scale`` in
    float32, then code * d) and vLLM's NVFP4 emulation divide by the stored reciprocal G. Against our s * g this
    differs by one float32 step for some (s, G) pairs, even when 1 / G rounds back to g exactly."""
    return block_scales.to(torch.float32) / stored.to(torch.float32).reshape(())
