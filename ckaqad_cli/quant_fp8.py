"""FP8 fake quantization of a Linear, the middle format a plan may give a unit (docs/fp8.md, kernels/fp8_ref.py).

Weights E4M3 with a scale per output channel; inputs (a W4A4 recipe) E4M3 with a dynamic scale per token, as
compressed-tensors' FP8_DYNAMIC preset; a W4A16 recipe leaves FP8 units' inputs as they are. Gradients pass
straight through.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ckaqad_kernels import fp8_ref


class _FakeQuantizeFP8STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fake_quantize):
        return fake_quantize(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class AdoptingLinear(nn.Linear):
    """An nn.Linear built around another one: it keeps that Linear's ``weight`` and ``bias`` Parameters (no copy, so
    state_dict names and optimizer state do not change). The base of the fake-quantized Linears."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias


class FP8Linear(AdoptingLinear):
    """A Linear whose weight (and, with ``quantize_input``, input) is FP8 fake-quantized row by row."""

    def __init__(self, linear: nn.Linear, *, quantize_input: bool):
        super().__init__(linear)
        self.quantize_input = quantize_input
        self.quantize_weight = True

    def quantized_weight(self) -> torch.Tensor:
        return _FakeQuantizeFP8STE.apply(self.weight, fp8_ref.fake_quantize_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.quantized_weight() if self.quantize_weight else self.weight
        if self.quantize_input:
            x = _FakeQuantizeFP8STE.apply(x, fp8_ref.fake_quantize_tokens)
        return F.linear(x, weight, self.bias)

    @staticmethod
    def swap_in(model: nn.Module, name: str, *, quantize_input: bool) -> nn.Linear:
        """Replace the Linear ``name`` of ``model`` by an FP8Linear over the same Parameters; the module replaced."""
        original = model.get_submodule(name)
        model.set_submodule(name, FP8Linear(original, quantize_input=quantize_input))
        return original

    def extra_repr(self) -> str:
        weight = "fp8 per channel" if self.quantize_weight else "off"
        return f"{super().extra_repr()}, weight={weight}" + (", input=fp8 per token" if self.quantize_input else "")
