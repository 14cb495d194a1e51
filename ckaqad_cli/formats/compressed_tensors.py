"""The compressed-tensors ``nvfp4-pack-quantized`` format, as vLLM and transformers (via compressed-tensors) read it.

Per quantized Linear ``M``:

- ``M.weight_packed``       uint8 [out, in/2], two E2M1 codes per byte, the even element in the low nibble
- ``M.weight_scale``        float8_e4m3fn [out, in/16], the block scales
- ``M.weight_global_scale`` float32 [1], the *reciprocal* of our global scale: (6 * 448) / amax
- ``M.input_global_scale``  float32 [1] (W4A4 only), the reciprocal of the calibrated input global scale

Per FP8 Linear ``M`` (a plan's ``--upgrade fp8`` units, docs/fp8.md):

- ``M.weight``              float8_e4m3fn [out, in], the E4M3 codes
- ``M.weight_scale``        float32 [out, 1], one scale per output channel

config.json carries ``quantization_config`` (quant_method compressed-tensors, one config group targeting Linear,
the ignore list, format, quantization_status compressed); with FP8 modules a second group (FP8_DYNAMIC's arguments,
format float-quantized) targets them by exact name, which compressed-tensors and vLLM match before a class name,
and the top-level format is mixed-precision.
"""

from __future__ import annotations

from typing import Any

import torch

from ckaqad_kernels.nvfp4_spec import BLOCK_SIZE

NAME = "compressed-tensors"
FORMAT = "nvfp4-pack-quantized"
FP8_FORMAT = "float-quantized"
MIXED_FORMAT = "mixed-precision"
FP8_PARAMS = ("weight", "weight_scale")
"""The names of what an FP8 Linear stores: its codes and its per-channel scales; None in a format without FP8."""
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


def _fp8_args(strategy: str, *, dynamic: bool) -> dict[str, Any]:
    """FP8 E4M3 arguments (FP8_DYNAMIC's). transformers loads a bf16 model's stored weight scales into bf16
    parameters: ckaqad's scales are bf16-exact for that reason (docs/fp8.md)."""
    return {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": dynamic}


def quantization_config(scheme: str, ignore: list[str], fp8: list[str] | None = None) -> dict[str, Any]:
    """config.json's ``quantization_config`` (the NVFP4 / NVFP4A16 presets of compressed-tensors), and the FP8
    modules' group (FP8_DYNAMIC, or FP8 weights only in w4a16) when there are any."""
    inputs = None
    if scheme == "w4a4":  # dynamic "local" block scales, a static stored input_global_scale
        inputs = {**_fp4_args(dynamic="local"), "observer": "static_minmax"}
    groups = {
        "group_0": {
            "targets": ["Linear"],
            "weights": _fp4_args(dynamic=False),
            "input_activations": inputs,
            "output_activations": None,
            "format": FORMAT,
        }
    }
    if fp8:
        groups["group_1"] = {
            "targets": list(fp8),
            "weights": _fp8_args("channel", dynamic=False),
            "input_activations": _fp8_args("token", dynamic=True) if scheme == "w4a4" else None,
            "output_activations": None,
            "format": FP8_FORMAT,
        }
    return {
        "quant_method": QUANT_METHOD,
        "format": MIXED_FORMAT if fp8 else FORMAT,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
    }


def extra_files(scheme: str, ignore: list[str]) -> dict[str, Any]:
    """JSON files written beside config.json: none (config.json says it all)."""
    return {}


def is_format(config: dict[str, Any]) -> bool:
    qc = config.get("quantization_config") or config.get("compression_config") or {}
    if qc.get("quant_method") != QUANT_METHOD:
        return False
    groups = (qc.get("config_groups") or {}).values()
    return qc.get("format") == FORMAT or (
        qc.get("format") == MIXED_FORMAT and any(isinstance(g, dict) and g.get("format") == FORMAT for g in groups))


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
