"""Fixtures shared by the stage tests: the loopback Hub (tests/hub_server.py) with the real huggingface_hub client
switched online against it, and the tokens it accepts."""

from __future__ import annotations

import pytest
from huggingface_hub import constants as hf_constants

from tests.hub_server import HubServer

FAKE_TOKEN = "hf_FAKEtokenDoNotPrint0123456789abcdef"
"""A token with write access on the loopback Hub; it must never appear in output, run.json or errors."""
READ_TOKEN = "hf_READonlyTokenDoNotPrint9876543210"
"""A token with read access only."""


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The loopback Hub, with the client switched online, without Xet, and with no stored token."""
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    # huggingface_hub reads these at import: patch the constants too.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf_home" / "stored_tokens"))
    with HubServer(tmp_path / "hub") as server:
        server.tokens[FAKE_TOKEN] = "write"
        server.tokens[READ_TOKEN] = "read"
        yield server
