"""NVIDIA ModelOpt's own NVFP4 weight quantization and Hugging Face export (W4A16_NVFP4_CFG: weights only, so no
calibration data) of a local HF checkpoint, as a script.

    python benchmarks/peer_modelopt.py SRC OUT

bench_pack.py times it as a whole command beside `ckaqad pack --format modelopt --scheme w4a16`.
"""

import sys
import warnings

import modelopt.torch.quantization as mtq
import torch
from modelopt.torch.export import export_hf_checkpoint
from transformers import AutoModelForCausalLM

warnings.filterwarnings("ignore", message="transformers .* is not tested")  # printed on every import
source, out = sys.argv[1:3]
model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
model = mtq.quantize(model, mtq.W4A16_NVFP4_CFG, forward_loop=None)
export_hf_checkpoint(model, export_dir=out)
