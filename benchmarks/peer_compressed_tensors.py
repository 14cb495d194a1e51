"""compressed-tensors' own NVFP4 weight compression (NVFP4A16) of a local HF checkpoint, as a script: what
llm-compressor's data-free NVFP4A16 recipe does through this library (attach the scheme to every Linear but the
head, global and block scales from the weights' min/max, ModelCompressor packs, save_pretrained writes).

    python benchmarks/peer_compressed_tensors.py SRC OUT

bench_pack.py times it as a whole command beside `ckaqad pack --format compressed-tensors --scheme w4a16`.
"""

import sys

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config
from compressed_tensors.quantization.quant_scheme import NVFP4A16
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam
from transformers import AutoModelForCausalLM

source, out = sys.argv[1:3]
model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], **NVFP4A16)},
                            ignore=["lm_head"], format="nvfp4-pack-quantized")
apply_quantization_config(model, config)
for module in model.modules():
    if getattr(module, "quantization_scheme", None) is None:
        continue
    w = module.weight.detach()
    amax = w.abs().amax().float()
    global_scale = generate_gparam(-amax, amax)
    blocks = w.float().reshape(w.shape[0], -1, 16)
    scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), module.quantization_scheme.weights,
                                 global_scale=global_scale)
    module.weight_global_scale.data.copy_(global_scale.reshape(module.weight_global_scale.shape))
    module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
compressor = ModelCompressor.from_pretrained_model(model, quantization_format="nvfp4-pack-quantized")
compressor.compress_model(model)
model.save_pretrained(out)
compressor.update_config(out)
