"""pack's W4A4 calibration: the fake-quantized student as distill ran it, the max |input| of each quantized Linear
over calibration text, and a stand-in for the modules calibration never reached (MoE experts no token was routed to).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.quant import QuantRecipe
from ckaqad_cli.quant_calibration import InputRecord, record_over


def load_student(source: Path, recipe: QuantRecipe, device: str, dtype: torch.dtype = torch.bfloat16,
                 second_moments: dict[str, torch.Tensor] | None = None):
    """(the fake-quantized student as distill ran it, tokenizer). An mse-act student gets ``second_moments`` as
    channel weights, else those its directory holds; without either it runs only under calibration."""
    from ckaqad_cli.models import RECIPE_FILE, load_model
    from ckaqad_cli.quant import apply_recipe, set_channel_weights
    from ckaqad_cli.quant_calibration import SECOND_MOMENTS_FILE, load_second_moments

    model, tokenizer = load_model(source, device=device, dtype=dtype)
    if not (source / RECIPE_FILE).is_file():
        apply_recipe(model, recipe)
    if recipe.scale_rule == "mse-act" and second_moments is not None:
        set_channel_weights(model, second_moments)
    elif recipe.scale_rule == "mse-act" and (source / SECOND_MOMENTS_FILE).is_file():
        set_channel_weights(model, load_second_moments(source))
    return model, tokenizer


def calibrate_inputs(model, tokenizer, data: str, tokens: int, seq_len: int) -> InputRecord:
    """What every fake-quantized module sees over ``tokens`` tokens of ``data``: ``.amax`` {module: max |input|}
    and ``.second_moments()`` {module: E[x^2] per input channel} (the mse-act channel weights)."""
    from ckaqad_cli.data import load_texts, pack_sequences

    ids = pack_sequences(load_texts(data), tokenizer, seq_len, max_tokens=max(tokens, seq_len))
    return record_over(model, ids)


_EXPERT = re.compile(r"^(?P<layer>.*\.experts)\.\d+\.(?P<leaf>.+)$")


def fill_input_amax(quantized: list[str], recorded: dict[str, float]) -> tuple[dict[str, float], dict[str, str]]:
    """A finite, positive input amax for every quantized module, and {module: how it was filled} for the others.

    An MoE expert that calibration never routed a token to has none (and a zero or missing input scale becomes inf,
    then NaN, in vLLM): it takes the largest amax of the same projection over the same layer's experts; failing
    that, of the same projection anywhere; failing that, the largest amax recorded.
    """
    good = {m: a for m, a in recorded.items() if math.isfinite(a) and a > 0}
    out: dict[str, float] = {}
    fallbacks: dict[str, str] = {}

    def leaf_of(name: str) -> str:
        return name.rpartition(".")[2]

    for module in quantized:
        if module in good:
            out[module] = good[module]
            continue
        m = _EXPERT.match(module)
        same_layer = [
            a
            for n, a in good.items()
            if m and (e := _EXPERT.match(n)) and (e["layer"], e["leaf"]) == (m["layer"], m["leaf"])
        ]
        same_leaf = [a for n, a in good.items() if leaf_of(n) == leaf_of(module)]
        if same_layer:
            out[module], fallbacks[module] = max(same_layer), "max over the same layer's experts"
        elif same_leaf:
            out[module], fallbacks[module] = max(same_leaf), f"max over all {leaf_of(module)} modules"
        elif good:
            out[module], fallbacks[module] = max(good.values()), "max over all modules"
        else:
            raise CkaqadError("calibration recorded no input amax at all: check --calib-data")
    return out, fallbacks
