"""What `ckaqad pack` records of its input in run.json, and that it reads each of the input's bytes once for it: the
weights' digests are taken from the reads that pack makes anyway, and equal the digests of the files."""

from __future__ import annotations

import collections

import pytest
from typer.testing import CliRunner

import ckaqad_cli.safetensors_io as sio
from ckaqad_cli.app import app
from ckaqad_cli.rundir import RunDir, describe_input
from fixtures import tiny_model_dir

runner = CliRunner()


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_pack_records_the_digests_of_what_it_read_reading_each_tensor_once(tmp_path, monkeypatch, shard):
    source = tiny_model_dir(tmp_path / "src", "llama", shard=shard)
    want = describe_input(source)
    reads: collections.Counter[str] = collections.Counter()
    real_get = sio.SafetensorsSource.get

    def counted_get(self, name, scratch=None):
        if self.directory == source:
            reads[name] += 1
        return real_get(self, name, scratch)

    monkeypatch.setattr(sio.SafetensorsSource, "get", counted_get)
    monkeypatch.setattr(sio, "tensors_sha256", lambda path: pytest.fail(f"{path} was read again to hash it"))
    run = RunDir(tmp_path / "run")
    result = runner.invoke(app, ["pack", "--run", str(run.path), "--model", str(source), "--out", str(tmp_path / "out"),
                                 "--scheme", "w4a16", "--no-verify"])
    assert result.exit_code == 0, result.output
    with sio.SafetensorsSource(source) as src:
        assert reads == dict.fromkeys(src.names(), 1)
    recorded = run.stage_entry("pack")["inputs"]["model"]
    assert recorded == want
    weights = [name for name in recorded["files"] if name.endswith(".safetensors")]
    assert len(weights) == (1 if shard is None else len(list(source.glob("*.safetensors")))) > 0
    assert all(recorded["files"][name].startswith("tensors-sha256:") for name in weights)
