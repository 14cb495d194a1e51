"""Packaging: our kernels/ folder must not pose as Hugging Face's `kernels` distribution."""

import importlib.metadata
import importlib.util

import ckaqad_kernels


def test_kernels_folder_installs_as_ckaqad_kernels():
    assert ckaqad_kernels.__file__.replace("\\", "/").endswith("kernels/__init__.py")
    assert set(importlib.metadata.packages_distributions().get("ckaqad_kernels", [])) == {"ckaqad"}


def test_transformers_probe_does_not_take_our_package_for_hf_kernels():
    from transformers.utils import import_utils

    owners = importlib.metadata.packages_distributions().get("kernels", [])
    assert "ckaqad" not in owners, "a top-level `kernels` module of ours would shadow Hugging Face's"
    spec = importlib.util.find_spec("kernels")
    assert spec is None or "ckaqad" not in str(spec.origin)
    available, version = import_utils._is_package_available("kernels", return_version=True)
    if not owners:  # Hugging Face's kernels is not installed here: transformers must see nothing
        assert (available, version) == (False, "N/A")
        assert import_utils.is_kernels_available() is False


def test_console_script_is_declared():
    eps = importlib.metadata.entry_points(group="console_scripts")
    assert any(ep.name == "ckaqad" and ep.value == "ckaqad_cli.app:main" for ep in eps)
