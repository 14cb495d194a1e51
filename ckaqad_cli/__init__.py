"""ckaqad: CKA-regularized quantization-aware distillation of BF16 LLMs into NVFP4."""

__version__ = "0.1.0"
