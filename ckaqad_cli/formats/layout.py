"""The tensors both NVFP4 formats store per quantized Linear, under each format's own names.

A format module declares ``PARAMS`` (its names for the packed weight, the block scales, the global scale and the W4A4
input scale, in that order), ``SCALE_SHAPE`` (the shape of the two scales it stores), and how a global scale in our
convention (amax / (6 * 448), the kernels') is stored (``store_scale``) and read back (``load_scale``), and how its
readers form each block's divisor from a stored block scale and global scale (``block_divisors``). Everything below
follows from those, the same for every format.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from ckaqad_cli.safetensors_io import TensorSpec
from ckaqad_kernels import nvfp4_ref
from ckaqad_kernels.nvfp4_spec import BLOCK_SIZE


def module_specs(fmt: ModuleType, module: str, out_features: int, in_features: int, scheme: str) -> list[TensorSpec]:
    """The tensors ``fmt`` writes for one quantized Linear, in write order (the input scale for W4A4 only)."""
    weight, block_scale, global_scale, input_scale = (f"{module}.{p}" for p in fmt.PARAMS)
    specs = [
        TensorSpec(weight, torch.uint8, (out_features, in_features // 2)),
        TensorSpec(block_scale, torch.float8_e4m3fn, (out_features, in_features // BLOCK_SIZE)),
        TensorSpec(global_scale, torch.float32, fmt.SCALE_SHAPE),
    ]
    if scheme == "w4a4":
        specs.append(TensorSpec(input_scale, torch.float32, fmt.SCALE_SHAPE))
    return specs


def encode(fmt: ModuleType, module: str, packed: Tensor, block_scales: Tensor, global_scale: Tensor,
           input_global_scale: Tensor | None) -> dict[str, Tensor]:
    """The stored tensors of :func:`module_specs`, from the kernels' output and our scales."""
    weight, block_scale, global_name, input_name = (f"{module}.{p}" for p in fmt.PARAMS)
    out = {weight: packed, block_scale: block_scales, global_name: fmt.store_scale(global_scale)}
    if input_global_scale is not None:
        out[input_name] = fmt.store_scale(input_global_scale)
    return out


def decode(fmt: ModuleType, tensors: dict[str, Tensor], module: str, dtype: torch.dtype) -> Tensor:
    """The dense weight of ``module`` from its stored tensors, as the format's readers decode it (our own unpacker:
    the kernels' decode with the format's block divisors)."""
    return nvfp4_ref.dequantize_with_divisors(tensors[f"{module}.{fmt.PARAMS[0]}"], divisors(fmt, tensors, module),
                                              dtype=dtype)


def divisors(fmt: ModuleType, tensors: dict[str, Tensor], module: str) -> Tensor:
    """The float32 block divisors [out, in/16] of ``module`` as the format's readers compute them."""
    _, block_scale, global_name, _ = (f"{module}.{p}" for p in fmt.PARAMS)
    return fmt.block_divisors(tensors[block_scale], tensors[global_name])


def decoded_global_scale(fmt: ModuleType, scale: Tensor) -> Tensor:
    """The global scale a reader decodes from what ``fmt`` stores for ``scale`` (0-d float32)."""
    return fmt.load_scale(fmt.store_scale(scale))
