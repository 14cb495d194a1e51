"""Packaging: our kernels/ folder must never pose as Hugging Face's `kernels`, whatever is on sys.path."""

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import ckaqad_kernels

REPO = Path(__file__).resolve().parents[1]
OUR_KERNELS = Path(ckaqad_kernels.__file__).resolve()


def test_kernels_folder_installs_as_ckaqad_kernels():
    assert OUR_KERNELS == REPO / "kernels" / "__init__.py"
    assert set(importlib.metadata.packages_distributions().get("ckaqad_kernels", [])) == {"ckaqad"}


def test_transformers_probe_does_not_take_our_package_for_hf_kernels():
    from transformers.utils import import_utils

    owners = importlib.metadata.packages_distributions().get("kernels", [])
    assert "ckaqad" not in owners, "a top-level `kernels` module of ours would shadow Hugging Face's"
    spec = importlib.util.find_spec("kernels")
    assert spec is None or Path(spec.origin).resolve() != OUR_KERNELS
    available, version = import_utils._is_package_available("kernels", return_version=True)
    if not owners:  # Hugging Face's kernels is not installed here: transformers must see nothing
        assert (available, version) == (False, "N/A")
        assert import_utils.is_kernels_available() is False


def _run_with_repo_first(code: str, *, hide_site_packages: bool = False) -> subprocess.CompletedProcess:
    prelude = f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
    if hide_site_packages:  # as if Hugging Face's kernels were not installed: only the stdlib and the repository
        prelude += "sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True, text=True
    )


def test_repository_root_first_on_sys_path_imports_transformers_llama():
    """`python -m ckaqad_cli.app` from a checkout and subprocesses with the root on PYTHONPATH see the real `kernels`."""
    probe = _run_with_repo_first(
        """
        import importlib.metadata, importlib.util, pathlib
        from transformers import LlamaConfig, LlamaForCausalLM
        LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2, vocab_size=32))
        try:
            import kernels
        except ModuleNotFoundError:
            print("absent")
        else:
            owners = importlib.metadata.packages_distributions().get("kernels", [])
            dist = importlib.metadata.distribution(owners[0]) if owners else None
            files = {str(pathlib.Path(dist.locate_file(f)).resolve()) for f in dist.files} if dist else set()
            print(owners, str(pathlib.Path(kernels.__file__).resolve()) in files)
        import ckaqad_kernels.nvfp4_ref
        print(pathlib.Path(ckaqad_kernels.__file__).resolve())
        """
    )
    assert probe.returncode == 0, probe.stderr
    first, second = probe.stdout.splitlines()
    # `kernels`, when importable, is the module that its own distribution (not ckaqad) installed
    assert first == "absent" or (first.endswith("True") and "ckaqad" not in first), first
    assert Path(second) == OUR_KERNELS


def test_repository_kernels_folder_is_not_importable_as_kernels_without_hf_kernels():
    probe = _run_with_repo_first(
        """
        try:
            import kernels
        except ModuleNotFoundError as e:
            print("refused", e.name, "kernels" in sys.modules)
        else:
            print("imported", kernels.__file__)
        """,
        hide_site_packages=True,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["refused", "kernels", "False"]


def test_console_script_is_declared():
    eps = importlib.metadata.entry_points(group="console_scripts")
    assert any(ep.name == "ckaqad" and ep.value == "ckaqad_cli.app:main" for ep in eps)
