"""`ckaqad pack --push-to-hub`: the two stages chained through the CLI against the loopback Hub (tests/hub_server.py)
with the real huggingface_hub client. A successful pack (verified) is pushed with push's options, byte for byte, and
both stages are recorded without the token; a failed pack sends nothing at all."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ckaqad_cli.app import app
from ckaqad_cli.atomic import OUTPUT_MARKER
from ckaqad_cli.rundir import RunDir
from fixtures import tiny_model_dir
from tests.hub_server import HubServer
from tests.stages.conftest import FAKE_TOKEN

REPO = "me/tiny-pack-push"
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny BF16 Llama built from a config (plain PTQ source: no quant recipe), with the built-in tokenizer."""
    return tiny_model_dir(tmp_path_factory.mktemp("source") / "llama", dtype=torch.bfloat16)


def _pack_push(run: Path, model: Path, hub: HubServer, *extra: str):
    args = ["pack", "--run", str(run), "--model", str(model), "--scheme", "w4a16", "--push-to-hub", REPO]
    return runner.invoke(app, [*args, "--endpoint", hub.url, "--token", FAKE_TOKEN, *extra])


def _uploaded_from(run: RunDir) -> dict[str, bytes]:
    """What a push of the run's pack uploads: the packed folder (hidden files aside), but the card and plot that
    push built in its own folder, RUN/push/ (pack's folder is left as pack wrote it)."""
    folder = run.path / "pack" / "model"
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}
    return files | {p.name: p.read_bytes() for p in run.stage_dir("push").iterdir() if p.is_file()}


def _tree_text(folder: Path) -> str:
    """Every text-decodable byte under ``folder`` (to search for a leaked token)."""
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in folder.rglob("*") if p.is_file())


def test_pack_then_push_uploads_the_verified_output_and_records_both(tiny_llama, hub, tmp_path):
    run = RunDir(tmp_path / "run")
    result = _pack_push(run.path, tiny_llama, hub, "--revision", "dev", "--private", "--commit-message", "tiny nvfp4")
    assert result.exit_code == 0, result.output
    assert FAKE_TOKEN not in result.output

    pack = run.stage_entry("pack")
    assert pack["status"] == "done"
    assert pack["metrics"]["verify"]["weights_bit_exact"]  # verify ran (on by default for a small source)
    push = run.stage_entry("push")
    assert push["status"] == "done"
    assert push["started"] >= pack["ended"]  # pushed after the pack finished
    repo = hub.repos[REPO]
    assert repo.private
    url = f"{hub.url}/{REPO}/tree/dev"
    assert push["outputs"] == {"repo_id": REPO, "revision": "dev", "commit": repo.branches["dev"], "url": url}
    assert url in result.output and repo.branches["dev"] in result.output
    assert repo.messages[repo.branches["dev"]].startswith("tiny nvfp4")
    assert set(repo.commits[repo.branches["main"]]) == {".gitattributes"}  # nothing landed on main

    folder = run.path / "pack" / "model"
    assert Path(push["inputs"]["model"]) == folder.resolve()
    local = _uploaded_from(run)
    assert (folder / OUTPUT_MARKER).is_file()  # ckaqad's own mark (pack --force may replace it), never uploaded
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= local.keys()
    remote = {path: data for path, data in hub.files(REPO, "dev").items() if path != ".gitattributes"}
    assert remote.keys() == local.keys()
    for name, data in local.items():
        assert remote[name] == data, name
    packed = load_file(folder / "model.safetensors")
    assert packed["model.layers.0.self_attn.q_proj.weight_packed"].dtype == torch.uint8  # really NVFP4
    # the card states the bits per Linear weight pack wrote: the same line in the packed and the pushed card
    bits = pack["metrics"]["linear_weight_bits"]
    line = f"**{bits:.4f} bits per Linear weight**"
    assert 4.5 < bits < 16 and line in (folder / "README.md").read_text() and line in local["README.md"].decode()

    assert FAKE_TOKEN not in _tree_text(run.path)  # run.json, summaries, card
    assert FAKE_TOKEN not in run.manifest_path.read_text()


def _nan_source(source: Path, tmp_path: Path) -> str:
    broken = tmp_path / "nan-llama"
    broken.mkdir()
    for p in source.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][7, 3] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    return str(broken)


@pytest.mark.parametrize("failure", ["NaN weight", "existing output without --force"])
def test_failed_pack_pushes_nothing(tiny_llama, hub, tmp_path, failure):
    run = RunDir(tmp_path / "run")
    model = tiny_llama
    if failure == "NaN weight":
        model, needles = _nan_source(tiny_llama, tmp_path), ["model.layers.1.mlp.up_proj.weight", "NaN"]
    else:
        existing = run.stage_dir("pack") / "model"
        existing.mkdir(parents=True)
        (existing / "keep.txt").write_text("mine")
        needles = ["exists", "--force"]
    result = _pack_push(run.path, Path(model), hub, "--revision", "dev", "--private")

    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert all(needle in lines[0] for needle in needles), lines[0]
    assert FAKE_TOKEN not in result.output
    assert hub.requests == [] and hub.received == [] and hub.repos == {}  # not even a create_repo
    assert run.stage_entry("pack")["status"] == "failed"
    assert run.stage_entry("push") is None
    if failure != "NaN weight":
        assert (run.stage_dir("pack") / "model" / "keep.txt").read_text() == "mine"
    assert FAKE_TOKEN not in _tree_text(run.path)


def test_failed_push_keeps_the_pack_and_push_resumes(tiny_llama, hub, tmp_path):
    run = RunDir(tmp_path / "run")
    hub.fail("commit", 500, f"backend exploded while serving {FAKE_TOKEN}")  # a server that echoes the token
    result = _pack_push(run.path, tiny_llama, hub, "--revision", "dev")

    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1].startswith("error:") and "500" in result.output
    assert FAKE_TOKEN not in result.output and FAKE_TOKEN not in _tree_text(run.path)
    assert run.stage_entry("pack")["status"] == "done"
    assert run.stage_entry("push")["status"] == "failed"
    assert hub.received == []  # the one commit failed

    # The pack stands: pushing the run's output alone finishes the job.
    args = ["push", "--run", str(run.path), "--repo-id", REPO, "--revision", "dev", "--endpoint", hub.url]
    again = runner.invoke(app, [*args, "--token", FAKE_TOKEN])
    assert again.exit_code == 0, again.output
    folder = run.path / "pack" / "model"
    local = _uploaded_from(run)
    assert (folder / OUTPUT_MARKER).is_file()  # ckaqad's own mark (pack --force may replace it), never uploaded
    assert {k: v for k, v in hub.files(REPO, "dev").items() if k != ".gitattributes"} == local


def test_failed_push_names_the_command_that_resumes_it(tiny_llama, hub, tmp_path):
    run = RunDir(tmp_path / "run")
    hub.fail("commit", 500, "backend exploded")
    line = _pack_push(run.path, tiny_llama, hub, "--revision", "dev").output.strip().splitlines()[-1]
    retry = f"ckaqad push --run {run.path} --repo-id {REPO} --revision dev --endpoint {hub.url}"
    assert line.startswith("error:") and retry in line, line


@pytest.mark.parametrize("bad", ["repo id", "no token"])
def test_bad_hub_options_fail_before_packing(tiny_llama, hub, tmp_path, bad):
    run = tmp_path / "run"
    args = ["pack", "--run", str(run), "--model", str(tiny_llama), "--scheme", "w4a16", "--endpoint", hub.url]
    if bad == "repo id":
        args += ["--push-to-hub", "org/bad name", "--token", FAKE_TOKEN]
    else:
        args += ["--push-to-hub", REPO]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert not (run / "pack").exists() and hub.requests == []
