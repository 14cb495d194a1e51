"""NVFP4 numerics: the written definition, PyTorch references and Triton kernels.

Installed as ``ckaqad_kernels`` (see pyproject.toml). Nothing here imports transformers.
"""
