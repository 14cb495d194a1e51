"""Streaming safetensors reading and the planned, sharded writer."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.safetensors_io import INDEX_FILE, SafetensorsSource, TensorSpec, check_file
from ckaqad_cli.safetensors_write import ShardedWriter, ensure_disk_space, ensure_writable, plan_shards
from ckaqad_cli.settings.pack import parse_size

DTYPES = [torch.bfloat16, torch.float32, torch.float16, torch.uint8, torch.float8_e4m3fn, torch.int64]


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype in (torch.uint8, torch.int64):
        return torch.randint(0, 200, shape, generator=g, dtype=dtype)
    return torch.randn(shape, generator=g).clamp(-400, 400).to(dtype)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _write_all(directory, tensors: dict[str, torch.Tensor], max_bytes: int) -> ShardedWriter:
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardedWriter(directory, specs, max_bytes)
    for n, t in tensors.items():
        writer.write(n, t)
    writer.close()
    return writer


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(
        st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 9), min_size=0, max_size=3)), min_size=1, max_size=8
    ),
    max_bytes=st.integers(1, 600),
)
def test_sharded_write_reads_back_exactly(tmp_path_factory, shapes, max_bytes):
    out = tmp_path_factory.mktemp("out")
    tensors = {f"t{i}.w": _tensor(d, tuple(s), i) for i, (d, s) in enumerate(shapes)}
    writer = _write_all(out, tensors, max_bytes)
    files = sorted(out.glob("*.safetensors"))
    assert len(files) == len(writer.shards)
    # the safetensors library itself accepts every shard, and the bytes round-trip exactly
    loaded = {}
    for f in files:
        loaded.update(load_file(f))
    assert loaded.keys() == tensors.keys()
    for n, t in tensors.items():
        assert loaded[n].dtype == t.dtype and loaded[n].shape == t.shape
        assert torch.equal(_bytes(loaded[n]), _bytes(t))
    if len(files) > 1:
        index = json.loads((out / INDEX_FILE).read_text())
        assert set(index["weight_map"]) == set(tensors)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
        for name, fname in index["weight_map"].items():
            with safe_open(out / fname, "pt") as f:
                assert name in f.keys()
    else:
        assert [f.name for f in files] == ["model.safetensors"] and not (out / INDEX_FILE).exists()
    assert writer.file_bytes == sum(f.stat().st_size for f in files)
    # and our reader reads the sharded directory back
    with SafetensorsSource(out) as src:
        assert set(src.names()) == set(tensors)
        for n, t in tensors.items():
            assert torch.equal(_bytes(src.get(n)), _bytes(t))


def test_reader_reads_files_of_the_safetensors_library_and_refuses_one_cut_short_later(tmp_path):
    tensors = {n: _tensor(d, (3, 5), i) for i, (n, d) in enumerate([("b", torch.bfloat16), ("a", torch.float8_e4m3fn),
                                                                  ("c", torch.int64), ("s", torch.float32)])}
    tensors["s"] = tensors["s"][0, 0].clone()  # a 0-d tensor
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with SafetensorsSource(tmp_path) as src:
        for n, t in tensors.items():
            got = src.get(n)
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(_bytes(got), _bytes(t))
        path = tmp_path / "model.safetensors"
        path.write_bytes(path.read_bytes()[:-8])  # truncated after it was opened
        last = max(tensors, key=lambda n: src._offset[n])
        with pytest.raises(CkaqadError, match=f"tensor {last} is cut short"):
            src.get(last)


def test_plan_shards_respects_the_limit():
    specs = [TensorSpec(f"t{i}", torch.float32, (n,)) for i, n in enumerate([10, 10, 30, 5, 5, 5])]
    shards = plan_shards(specs, 80)
    assert [[s.name for s in sh] for sh in shards] == [["t0", "t1"], ["t2"], ["t3", "t4", "t5"]]
    assert all(sum(s.nbytes for s in sh) <= 120 for sh in shards)


def test_writer_refuses_a_tensor_out_of_plan(tmp_path):
    writer = ShardedWriter(tmp_path, [TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.float32, (2,))], 99)
    with pytest.raises(ValueError, match="expected a"):
        writer.write("b", torch.zeros(2))
    writer = ShardedWriter(tmp_path, [TensorSpec("a", torch.float32, (2,))], 99)
    with pytest.raises(ValueError, match="planned"):
        writer.write("a", torch.zeros(3))


def test_source_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CkaqadError, match="no safetensors"):
        SafetensorsSource(tmp_path)


def test_pickle_only_source_is_refused_without_unpickling(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CkaqadError, match="pickle"):
        SafetensorsSource(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_file_is_a_one_line_error(tmp_path, damage):
    save_file({"w": torch.randn(64, 64)}, tmp_path / "model.safetensors")
    raw = (tmp_path / "model.safetensors").read_bytes()
    bad = raw[: len(raw) - 100] if damage == "truncate" else b"\x20\x00\x00\x00\x00\x00\x00\x00" + b"x" * 40
    (tmp_path / "model.safetensors").write_bytes(bad)
    with pytest.raises(CkaqadError, match="corrupt or truncated") as e:
        SafetensorsSource(tmp_path)
    assert "\n" not in str(e.value)


def test_index_naming_a_missing_shard(tmp_path):
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CkaqadError, match="missing"):
        SafetensorsSource(tmp_path)


def test_disk_space_check(tmp_path, monkeypatch):
    ensure_disk_space(tmp_path / "new" / "dir", 1000)
    import ckaqad_cli.safetensors_write as sio

    monkeypatch.setattr(sio.shutil, "disk_usage", lambda p: type("U", (), {"free": 10})())
    with pytest.raises(CkaqadError, match="not enough disk space"):
        ensure_disk_space(tmp_path / "new", 1000)


@pytest.mark.parametrize(
    ("text", "expected"), [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("123", 123), (77, 77)]
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_rejects_nonsense():
    with pytest.raises(CkaqadError):
        parse_size("lots")


@pytest.mark.parametrize("text", ["0", "0MB", 0, "0.0001KB", "-5", -5, "lots", "5 parsecs"])
def test_parse_size_refuses_zero_negative_and_garbage_naming_the_option(text):
    with pytest.raises(CkaqadError, match=r"^--max-shard-size '?-?[\w. ]+'? ") as e:
        parse_size(text)
    assert "\n" not in str(e.value) and "500MB" in str(e.value)


def test_check_file_names_a_corrupt_or_truncated_file(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(64, 64)}, str(good))
    check_file(good)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    junk = tmp_path / "junk.safetensors"
    junk.write_text("garbage")
    for bad in (cut, junk):
        with pytest.raises(CkaqadError, match=f"^{bad} is not a readable safetensors file"):
            check_file(bad)


def make_unwritable(directory, monkeypatch):
    """``directory`` made read-only (mode 0o555). Root writes there all the same, so under root the probes of
    ensure_writable and every other temporary file or directory made inside it fail as they would for a user."""
    import os
    import tempfile
    from pathlib import Path

    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o555)
    if os.geteuid() != 0:
        return directory

    def refusing(real):
        def make(*args, **kwargs):
            where = kwargs.get("dir")
            if where is not None and Path(where).resolve() == directory.resolve():
                raise PermissionError(13, "Permission denied", str(where))
            return real(*args, **kwargs)
        return make

    monkeypatch.setattr(tempfile, "mkstemp", refusing(tempfile.mkstemp))
    monkeypatch.setattr(tempfile, "mkdtemp", refusing(tempfile.mkdtemp))
    return directory


def test_ensure_writable_names_the_path_and_leaves_nothing(tmp_path, monkeypatch):
    ensure_writable(tmp_path / "new" / "run", "--run")  # creatable: nothing made
    ensure_writable(tmp_path, "--run")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "ro" / "sub").mkdir(parents=True)
    ro = make_unwritable(tmp_path / "ro", monkeypatch)
    with pytest.raises(CkaqadError, match=f"^--run {ro} is not writable .*choose a directory you can write to$"):
        ensure_writable(ro, "--run")
    with pytest.raises(CkaqadError, match=f"^--run {ro}/run cannot be created in {ro} "):
        ensure_writable(ro / "run", "--run")
    ensure_writable(ro / "sub", "--out")  # writable itself, but it cannot be replaced in its read-only parent:
    with pytest.raises(CkaqadError, match=f"^--out {ro}/sub cannot be created in {ro} "):
        ensure_writable(ro / "sub", "--out", replaced=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CkaqadError, match="is not a directory"):
        ensure_writable(tmp_path / "file" / "run", "--run")


# -- digests taken while reading (run.json's record of pack's input) ----------------------------------------------


def test_digests_taken_while_reading_in_any_order_equal_the_files_digests(tmp_path):
    from ckaqad_cli.safetensors_io import tensors_sha256

    tensors = {f"t{i}": _tensor(d, s, i) for i, (d, s) in enumerate(
        [(torch.bfloat16, (7, 5)), (torch.float32, (0,)), (torch.uint8, (300,)), (torch.int64, ()),
         (torch.float16, (9,))]
    )}
    for directory in (tmp_path / "ours", tmp_path / "lib"):
        directory.mkdir()
    _write_all(tmp_path / "ours", tensors, 100)  # sharded, in plan order
    save_file(tensors, str(tmp_path / "lib" / "model.safetensors"))  # in the library's order
    for directory in (tmp_path / "ours", tmp_path / "lib"):
        with SafetensorsSource(directory, digest=True) as src:
            names = src.names()
            scratch = torch.empty(4096, dtype=torch.uint8)
            for i, name in enumerate(reversed(names[1:])):  # out of file order, into a scratch buffer or not
                src.get(name, scratch if i % 2 else None)
            partial = src.digests()
            src.get(names[0])
            src.get(names[1])  # read again: the digest is the first read's
            digests = src.digests()
        files = sorted(p.name for p in directory.glob("*.safetensors"))
        assert sorted(digests) == files and len(partial) < len(files)
        for name, digest in digests.items():
            assert digest == tensors_sha256(directory / name)
            assert digest.startswith("tensors-sha256:") and len(digest) == len("tensors-sha256:") + 64
    with SafetensorsSource(tmp_path / "lib") as src:
        with pytest.raises(ValueError, match="without digest"):
            src.digests()


def test_the_digest_fixes_every_byte_and_is_none_for_a_file_its_tensors_do_not_fill(tmp_path):
    from ckaqad_cli.safetensors_io import tensors_sha256

    path = tmp_path / "model.safetensors"
    save_file({"a": torch.arange(64, dtype=torch.float32), "b": torch.ones(3, 3)}, str(path), metadata={"k": "v"})
    data = path.read_bytes()
    digest = tensors_sha256(path)
    for where in (3, 20, len(data) - 40, len(data) - 1):  # the header's length, its JSON, tensor a, tensor b
        changed = bytearray(data)
        changed[where] ^= 1
        path.write_bytes(changed)
        assert tensors_sha256(path) != digest
    path.write_bytes(data + b"\0")  # a byte the tensors do not cover
    assert tensors_sha256(path) is None
    path.write_text("not safetensors")
    assert tensors_sha256(path) is None


# -- the writer's uncached writes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("refused", ["nothing", "at open", "at a write"])
def test_writer_bytes_are_the_same_with_or_without_o_direct(tmp_path, monkeypatch, refused):
    import errno
    import fcntl
    import os

    import ckaqad_cli.safetensors_write as sio

    monkeypatch.setattr(sio, "_STAGING_BYTES", 8192)  # several full buffers, and a tail that is no whole block
    tensors = {f"t{i}": _tensor(torch.bfloat16, (n,), i) for i, n in enumerate([3000, 1, 9000, 77])}
    (tmp_path / "want").mkdir()
    (tmp_path / "got").mkdir()
    _write_all(tmp_path / "want", tensors, 10**6)
    real_open, real_write = os.open, os.write
    direct = getattr(os, "O_DIRECT", 0)
    refusals = []

    def refusing_open(path, flags, *args):
        if refused == "at open" and flags & direct:
            refusals.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    def refusing_write(fd, data):
        if refused == "at a write" and fcntl.fcntl(fd, fcntl.F_GETFL) & direct:
            refusals.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(sio.os, "open", refusing_open)
    monkeypatch.setattr(sio.os, "write", refusing_write)
    _write_all(tmp_path / "got", tensors, 10**6)
    monkeypatch.undo()
    assert len(refusals) == (0 if refused == "nothing" or not direct else 1)
    got, want = (tmp_path / d / "model.safetensors" for d in ("got", "want"))
    assert got.read_bytes() == want.read_bytes()
    loaded = load_file(got)
    assert all(torch.equal(_bytes(loaded[n]), _bytes(t)) for n, t in tensors.items())
