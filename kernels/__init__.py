"""NVFP4 numerics: the written definition, PyTorch references and Triton kernels.

Installed as ``ckaqad_kernels`` (see pyproject.toml). Nothing here imports transformers.

The folder is named ``kernels/``, which is also the import name of Hugging Face's ``kernels`` distribution (imported
by transformers). Whenever the repository root is on ``sys.path`` (``python -m`` or a script run from a checkout, a
subprocess with the root on PYTHONPATH), ``import kernels`` would find this folder first. So when this file runs
under any name but ``ckaqad_kernels``, it hands the name over: it loads the first ``kernels`` found on the rest of
``sys.path`` (Hugging Face's, if installed) in its place, or raises ``ModuleNotFoundError`` as if this folder did not
exist. Python's import returns whatever ``sys.modules`` holds after this file runs, so the caller gets that module.
"""

if __name__ != "ckaqad_kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _hand_over(name: str) -> None:
        here = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
        rest = [p for p in sys.path if os.path.realpath(p or os.curdir) != here]
        spec = importlib.machinery.PathFinder.find_spec(name, rest)
        if spec is None or spec.loader is None:
            del sys.modules[name]
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise

    _hand_over(__name__)
    del _hand_over
