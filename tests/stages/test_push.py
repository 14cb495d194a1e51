"""`ckaqad push` against a Hub-compatible server on 127.0.0.1 (tests/hub_server.py), with the real huggingface_hub
client: round trip byte for byte, resume after an interruption, and one clear, token-free line for every bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import snapshot_download
from typer.testing import CliRunner

from ckaqad_cli.app import app
from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.rundir import RunDir
from ckaqad_cli.settings.push import PushConfig
from ckaqad_cli.stages.push import push_folder, redact
from fixtures import packed_model_dir
from tests.hub_server import HubServer
from tests.stages.conftest import FAKE_TOKEN, READ_TOKEN

runner = CliRunner()


@pytest.fixture(scope="session")
def packed_template(tmp_path_factory) -> Path:
    return packed_model_dir(tmp_path_factory.mktemp("template") / "model")


@pytest.fixture
def packed_run(tmp_path, packed_template) -> RunDir:
    """A run whose pack stage is done, recording its files' sizes, plus a distill and a diagnose record."""
    run = RunDir(tmp_path / "run")
    with run.stage("distill", config={"teacher": "org/tiny-base", "cka_lambda": 0.5, "scheme": "w4a16"}) as rec:
        rec.outputs["student"] = "distill/student"
        rec.metrics["steps"] = 20
    with run.stage("pack", config={"format": "compressed-tensors"}) as rec:
        model = run.stage_dir("pack") / "model"
        shutil.copytree(packed_template, model)
        rec.outputs.update(
            model="pack/model",
            format="compressed-tensors",
            scheme="w4a16",
            files=[{"path": p.name, "size": p.stat().st_size} for p in sorted(model.iterdir())],
        )
    with run.stage("diagnose", config={}) as rec:
        (run.stage_dir("diagnose") / "cka.png").write_bytes(b"\x89PNG\r\n\x1a\nnot-really-a-png")
        rec.outputs["plot"] = "diagnose/cka.png"
        rec.metrics["cka_qad"] = {"mean_cka": 0.991, "min_cka": 0.975, "kl": 0.0123, "top1": 0.93}
    return run


def _push_cli(run: RunDir, hub: HubServer, *extra: str, token: str | None = FAKE_TOKEN):
    args = ["push", "--run", str(run.path), "--repo-id", "me/tiny-nvfp4", "--endpoint", hub.url, *extra]
    if token is not None:
        args += ["--token", token]
    return runner.invoke(app, args)


def _assert_one_clean_line(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    text = result.output.strip()
    assert text.startswith("error:") and "\n" not in text, text
    for needle in needles:
        assert needle in text, text
    assert FAKE_TOKEN not in result.output and READ_TOKEN not in result.output


def test_push_then_download_is_byte_identical_and_loads(packed_run, hub, tmp_path):
    result = _push_cli(packed_run, hub, "--revision", "nvfp4", "--private")
    assert result.exit_code == 0, result.output
    assert FAKE_TOKEN not in result.output

    entry = packed_run.stage_entry("push")
    assert entry["status"] == "done"
    repo = hub.repos["me/tiny-nvfp4"]
    assert repo.private
    assert entry["outputs"] == {
        "repo_id": "me/tiny-nvfp4",
        "revision": "nvfp4",
        "commit": repo.branches["nvfp4"],
        "url": f"{hub.url}/me/tiny-nvfp4/tree/nvfp4",
    }
    assert FAKE_TOKEN not in packed_run.manifest_path.read_text()
    # Weights in one commit per shard batch, the small files last; main keeps only the initial commit.
    assert repo.branches["main"] != repo.branches["nvfp4"]
    assert set(repo.commits[repo.branches["main"]]) == {".gitattributes"}
    message = repo.messages[repo.branches["nvfp4"]]
    assert "NVFP4 W4A16" in message and "CKA-QAD" in message and "org/tiny-base" in message and "run" in message

    folder = packed_run.path / "pack" / "model"
    pack_files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}
    assert "cka_per_layer.png" not in pack_files  # push leaves the packed folder as pack wrote it ...
    own = packed_run.stage_dir("push")  # ... and builds the card and plot it uploads in its own folder
    local = pack_files | {p.name: p.read_bytes() for p in own.iterdir() if p.is_file()}
    assert "cka_per_layer.png" in local and "## How it was made" in local["README.md"].decode()
    assert sum(name.endswith(".safetensors") for name in local) >= 2  # sharded

    download = Path(
        snapshot_download(
            "me/tiny-nvfp4",
            revision="nvfp4",
            endpoint=hub.url,
            token=FAKE_TOKEN,
            local_dir=tmp_path / "download",
            cache_dir=tmp_path / "dl_cache",
        )
    )
    got = {p.name: p.read_bytes() for p in download.iterdir() if p.is_file() and p.name != ".gitattributes"}
    assert got.keys() == local.keys()
    for name, data in local.items():
        assert got[name] == data, name

    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 9, 12]])
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    pulled = AutoModelForCausalLM.from_pretrained(download, dtype=torch.bfloat16)
    torch.testing.assert_close(pulled(ids).logits, reference(ids).logits, rtol=0, atol=0)
    # transformers decoded NVFP4: each block of 16 weights holds at most the 8 magnitudes of the E2M1 grid.
    w = pulled.model.layers[0].self_attn.q_proj.weight.detach().float().reshape(-1, 16).abs()
    assert max(len(torch.unique(block)) for block in w) <= 8


def test_interrupted_push_resumes_without_resending(packed_run, hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # read at call time, not at import
    cfg = PushConfig(repo_id="me/resume", commit_bytes=1)  # one commit per weight shard
    hub.fail("commit", 500, "backend exploded", skip=1)
    with pytest.raises(CkaqadError) as err:
        push_folder(None, cfg, token=FAKE_TOKEN, run=packed_run)
    message = str(err.value)
    assert "500" in message and "run the same command again" in message and "\n" not in message
    assert packed_run.stage_entry("push")["status"] == "failed"

    first = list(hub.received)
    assert len(first) == 1 and first[0].endswith(".safetensors")  # one shard arrived before the failure
    result = push_folder(None, cfg, token=FAKE_TOKEN, run=packed_run)
    resent = hub.received[len(first) :]
    folder = packed_run.path / "pack" / "model"
    all_files = {p.name for p in folder.iterdir() if not p.name.startswith(".")} | {"README.md", "cka_per_layer.png"}
    assert first[0] not in resent
    assert sorted(resent) == sorted(all_files - set(first))
    assert result["files_skipped"] == 1 and result["files_uploaded"] == len(all_files) - 1
    assert set(hub.files("me/resume")) - {".gitattributes"} == all_files

    # Nothing changed: a further push sends no file and reports the same commit.
    again = push_folder(None, PushConfig(repo_id="me/resume", force=True), token=FAKE_TOKEN, run=packed_run)
    assert len(hub.received) == len(first) + len(resent)
    assert again["commit_oid"] == result["commit_oid"] == hub.repos["me/resume"].branches["main"]


@pytest.mark.parametrize("source", ["HF_TOKEN", "stored login"])
def test_token_from_environment_or_stored_login(packed_run, hub, monkeypatch, source):
    if source == "HF_TOKEN":
        monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    else:
        Path(hf_constants.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
        Path(hf_constants.HF_TOKEN_PATH).write_text(FAKE_TOKEN)
    result = _push_cli(packed_run, hub, "--commit-message", "my message", "--json", token=None)
    assert result.exit_code == 0, result.output
    assert FAKE_TOKEN not in result.output
    out = json.loads(result.stdout)
    repo = hub.repos["me/tiny-nvfp4"]
    assert out["commit_oid"] == repo.branches["main"]
    assert repo.messages[out["commit_oid"]].startswith("my message")


def test_no_token_says_how_to_log_in(packed_run, hub):
    result = _push_cli(packed_run, hub, token=None)
    _assert_one_clean_line(result, "hf auth login", "HF_TOKEN")
    assert hub.requests == []


@pytest.mark.parametrize("repo_id", ["just-a-name", "a/b/c", "org/bad name", "org/--double", ""])
def test_invalid_repo_id(packed_run, hub, repo_id):
    result = runner.invoke(app, ["push", "--run", str(packed_run.path), "--repo-id", repo_id, "--token", FAKE_TOKEN])
    _assert_one_clean_line(result, "repo id")
    assert hub.requests == []


def _break(folder: Path, how: str) -> str:
    if how == "no quantization_config":
        config = json.loads((folder / "config.json").read_text())
        del config["quantization_config"]
        (folder / "config.json").write_text(json.dumps(config))
        return "no quantization_config"
    if how == "missing shard":
        next(folder.glob("model-00002-*.safetensors")).unlink()
        return "is missing"
    if how == "truncated shard":
        shard = next(folder.glob("model-00001-*.safetensors"))
        shard.write_bytes(shard.read_bytes()[:-10])
        return "truncated"
    if how == "size differs from run.json":
        (folder / "tokenizer.json").write_text((folder / "tokenizer.json").read_text() + " ")
        return "pack recorded"
    if how == "no config":
        (folder / "config.json").unlink()
        return "no config.json"
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["no quantization_config", "missing shard", "truncated shard", "size differs from run.json", "no config"]
)
def test_incomplete_pack_output_is_refused(packed_run, hub, how):
    needle = _break(packed_run.path / "pack" / "model", how)
    result = _push_cli(packed_run, hub)
    _assert_one_clean_line(result, needle)
    assert hub.requests == []


def test_run_without_pack_stage_is_refused(hub, tmp_path):
    run = RunDir(tmp_path / "fresh")
    with run.stage("diagnose", config={}):
        pass
    result = _push_cli(run, hub)
    _assert_one_clean_line(result, "no finished pack stage", "ckaqad pack")


def test_folder_without_run_checks_config_and_shards(packed_template, hub, tmp_path):
    folder = tmp_path / "loose"
    shutil.copytree(packed_template, folder)
    _break(folder, "missing shard")
    args = ["push", "--run", str(tmp_path / "none"), "--folder", str(folder), "--repo-id", "me/x"]
    _assert_one_clean_line(runner.invoke(app, [*args, "--endpoint", hub.url, "--token", FAKE_TOKEN]), "is missing")
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize(
    ("token", "fault", "needles"),
    [
        ("hf_UNKNOWNtokenShouldBeRedacted42", None, ["401", "hf auth login"]),
        (READ_TOKEN, None, ["403", "write access"]),
        (FAKE_TOKEN, 500, ["500", "run the same command again"]),
    ],
)
def test_server_errors_are_one_redacted_line(packed_run, hub, token, fault, needles):
    if fault:
        hub.fail("create", fault, f"database on fire while serving {FAKE_TOKEN}")
    result = _push_cli(packed_run, hub, token=token)
    _assert_one_clean_line(result, *needles)
    assert token not in result.output
    manifest = packed_run.manifest_path.read_text()
    assert token not in manifest and "hf_UNKNOWN" not in manifest
    assert packed_run.stage_entry("push")["status"] == "failed"


def test_offline_mode_is_named(packed_run, hub, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    _assert_one_clean_line(_push_cli(packed_run, hub), "HF_HUB_OFFLINE")
    assert hub.requests == []


def test_dry_run_lists_files_and_card_without_network(packed_run, tmp_path):
    folder = packed_run.path / "pack" / "model"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    args = ["push", "--run", str(packed_run.path), "--repo-id", "me/dry", "--endpoint", "http://127.0.0.1:9"]
    result = runner.invoke(app, [*args, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing written
    for name in before:
        assert name in result.output
    assert "cka_per_layer.png" in result.output and "README.md" in result.output
    assert "base_model_relation: quantized" in result.output and "vllm serve me/dry" in result.output
    assert packed_run.stage_entry("push") is None


def test_dry_run_in_a_log_fits_80_columns_with_the_repo_id_whole(packed_run, monkeypatch):
    from ckaqad_cli.cli.common import console

    monkeypatch.setattr(console, "width", 80)  # stderr a log file: rich renders at 80 columns
    repo = "my-organisation/a-rather-long-repository-name-nvfp4-cka-qad"
    result = runner.invoke(app, ["push", "--run", str(packed_run.path), "--repo-id", repo, "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert any(f"{repo}@main" in line for line in lines), result.stderr
    assert "…" not in result.stderr and max(len(line) for line in lines) <= 80, result.stderr
    for name in ("README.md", "model.safetensors", "cka_per_layer.png", "total"):
        assert name in result.stderr


def test_redact_hides_the_token_and_token_shaped_strings():
    text = f"failed for {FAKE_TOKEN}; Authorization: Bearer abc.def; other hf_abcdefghijklmnop"
    out = redact(text, FAKE_TOKEN)
    assert FAKE_TOKEN not in out and "abc.def" not in out and "hf_abcdefghijklmnop" not in out
    assert out.startswith("failed for ***")


def test_folder_alone_reads_no_run_not_even_the_default_one(packed_run, tmp_path, monkeypatch):
    """`--folder` without `--run` pushes that folder with a card of its own: runs/default in the working directory
    (another run) is neither read nor recorded in."""
    cwd = tmp_path / "cwd"
    shutil.copytree(packed_run.path, cwd / "runs" / "default")
    folder = shutil.copytree(packed_run.path / "pack" / "model", tmp_path / "elsewhere")
    monkeypatch.chdir(cwd)
    result = runner.invoke(app, ["push", "--folder", str(folder), "--repo-id", "me/other", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "org/tiny-base" not in result.output and "0.991" not in result.output  # the default run's teacher, CKA
    assert "No diagnose numbers were recorded" in result.output
    result = runner.invoke(app, ["push", "--repo-id", "me/other", "--dry-run"])  # no --folder: runs/default
    assert result.exit_code == 0 and "org/tiny-base" in result.output


def test_a_pack_older_than_the_runs_distill_is_refused(packed_run):
    """`distill --force` after pack leaves the old packed weights: pushing them with the new run's card is refused."""
    data = json.loads(packed_run.manifest_path.read_text())
    data["stages"]["distill"]["ended"] = "2099-01-01T00:00:00+00:00"  # distilled again after the pack
    packed_run.manifest_path.write_text(json.dumps(data))
    result = runner.invoke(app, ["push", "--run", str(packed_run.path), "--repo-id", "me/x", "--dry-run"])
    _assert_one_clean_line(result, "predates its distilled student", "ckaqad pack --run")
