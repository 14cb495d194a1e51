"""Streaming safetensors reads: a (sharded) checkpoint one tensor at a time; the names, dtypes and shapes shared
with the writer (:mod:`ckaqad_cli.safetensors_write`).

Reading validates each file with ``safe_open``, then reads one tensor at a time straight from the file into a new
tensor (one copy, no mapping left resident), so memory holds one tensor, not the model.

Reading can also record each file's digest as it goes (``SafetensorsSource(..., digest=True)``): the input record
of run.json then costs no second read of the weights (see :func:`tensors_sha256`).

Pickle checkpoints (``pytorch_model.bin``, ``*.pt``) are refused, never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ckaqad_cli.errors import CkaqadError

TENSORS_SHA256 = "tensors-sha256"
"""Name of the digest of a safetensors file recorded in run.json (see tensors_sha256)."""
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's name, dtype and shape, without its data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def dtype_name(self) -> str:
        """The dtype as a safetensors header names it ("BF16", "F8_E4M3", ...)."""
        return _DTYPE_NAMES[self.dtype]


# -- reading ---------------------------------------------------------------------------------------------------


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files holding a checkpoint's weights (via its index when sharded), checked to exist."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CkaqadError(f"{directory} is not a directory")
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CkaqadError(f"{index} is not a valid safetensors index ({e})") from None
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CkaqadError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
        return files
    files = sorted(p for p in directory.glob("*.safetensors") if not p.name.startswith("."))
    if files:
        return files
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CkaqadError(
            f"{directory} holds only pickle checkpoints ({', '.join(pickles[:3])}); ckaqad never unpickles weights: "
            "convert them to safetensors first (e.g. model.save_pretrained(dir, safe_serialization=True))"
        )
    raise CkaqadError(f"{directory} holds no safetensors weights (no *.safetensors, no {INDEX_FILE})")


class SafetensorsSource:
    """The tensors of a safetensors checkpoint directory, one file or sharded, read one tensor at a time.

    Opening reads and validates every file's header (a corrupt or truncated file is a one-line CkaqadError);
    :meth:`get` then loads a single tensor. Use as a context manager or call :meth:`close`.
    With ``digest``, each tensor's SHA-256 is taken as it is first read (on the reading thread, which the hash lets
    run beside others), and :meth:`digests` gives each file's :func:`tensors_sha256` once all its tensors were read.
    """

    def __init__(self, directory: str | os.PathLike, *, digest: bool = False):
        self.directory = Path(directory)
        self.files = weight_files(self.directory)
        self._specs: dict[str, TensorSpec] = {}
        self._file_of: dict[str, Path] = {}
        self._offset: dict[str, int] = {}  # where each tensor's bytes start in its file
        self._headers: dict[Path, _Header] = {}
        self._sha256: dict[str, bytes] | None = {} if digest else None  # tensor -> SHA-256 of its bytes, as read
        for path in self.files:
            with self._open(path) as handle:  # validates the header (size, offsets) before we read it ourselves
                header = self._headers[path] = _read_header(path)
                self._offset.update((name, start) for name, (start, _) in header.ranges.items())
                for name in handle.keys():
                    if name in self._specs:
                        raise CkaqadError(f"tensor {name} appears in both {self._file_of[name].name} and {path.name}")
                    sl = handle.get_slice(name)
                    dtype = _DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise CkaqadError(f"{path.name}: tensor {name} has unsupported dtype {sl.get_dtype()}")
                    self._specs[name] = TensorSpec(name, dtype, tuple(sl.get_shape()))
                    self._file_of[name] = path

    @staticmethod
    def _open(path: Path):
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError) as e:
            raise CkaqadError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from None

    def __enter__(self) -> SafetensorsSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing stays open between reads; kept so the source works as a context manager."""

    def __contains__(self, name: str) -> bool:
        return name in self._specs

    def __len__(self) -> int:
        return len(self._specs)

    def names(self) -> list[str]:
        """Tensor names, grouped by file in the order the files are listed."""
        return list(self._specs)

    def spec(self, name: str) -> TensorSpec:
        return self._specs[name]

    def specs(self) -> list[TensorSpec]:
        return list(self._specs.values())

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self._specs.values())

    def get(self, name: str, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Load one tensor: its bytes are read from the file straight into a new tensor, or into ``scratch``.

        ``scratch`` (uint8, at least the tensor's bytes) makes the result a view of it, valid until the scratch is
        reused: reading into memory already touched skips the page faults and zeroing of a fresh allocation (for a
        checkpoint in the page cache, 0.22 s against 1.0 s per 2 GB on one core).
        No mapping is used: safe_open's pages would stay resident (and counted in RSS) while a handle holds them,
        and copying out of a mapping costs a second pass over the data.
        """
        spec, path = self._specs[name], self._file_of[name]
        if scratch is None:
            out = torch.empty(spec.shape, dtype=spec.dtype)
            raw = out.reshape(-1).view(torch.uint8)
        else:
            raw = scratch[: spec.nbytes]
            out = raw.view(spec.dtype).reshape(spec.shape)
        data = memoryview(raw.numpy())
        try:
            with open(path, "rb") as f:
                f.seek(self._offset[name])
                got = f.readinto(data) if spec.nbytes else 0
        except OSError as e:
            raise CkaqadError(f"{path}: cannot read tensor {name}: {e}") from None
        if got != spec.nbytes:
            raise CkaqadError(f"{path}: tensor {name} is cut short ({got} of {spec.nbytes} bytes): truncated file?")
        if self._sha256 is not None and name not in self._sha256:
            self._sha256[name] = hashlib.sha256(data).digest()  # releases the GIL: other readers run meanwhile
        return out

    def digests(self) -> dict[str, str]:
        """{file name relative to the directory: its :func:`tensors_sha256`} for each weight file all of whose tensors
        were read since the source was opened with ``digest``."""
        if self._sha256 is None:
            raise ValueError("this SafetensorsSource was opened without digest=True")
        out = {}
        for path, header in self._headers.items():
            if all(name in self._sha256 for name in header.ranges) and header.tiles(path.stat().st_size):
                key = path.relative_to(self.directory).as_posix()
                out[key] = header.digest(self._sha256[name] for name in header.in_file_order())
        return out


def check_file(path: str | os.PathLike) -> None:
    """A one-line CkaqadError naming ``path`` when it is not a readable safetensors file (its header and size are
    checked, no tensor is read)."""
    with SafetensorsSource._open(Path(path)):
        pass


@dataclass(frozen=True)
class _Header:
    """A safetensors file's header as stored (the 8-byte length and the JSON) and each tensor's byte range in the
    file."""

    raw: bytes
    ranges: dict[str, tuple[int, int]]

    def in_file_order(self) -> list[str]:
        return sorted(self.ranges, key=lambda name: (*self.ranges[name], name))

    def tiles(self, file_size: int) -> bool:
        """Whether the tensors' bytes follow the header back to back up to the end of the file (as safetensors
        requires: then the header and the tensors' bytes are the whole file)."""
        end = len(self.raw)
        for name in self.in_file_order():
            start, stop = self.ranges[name]
            if start != end:
                return False
            end = stop
        return end == file_size

    def digest(self, tensor_sha256: Iterable[bytes]) -> str:
        h = hashlib.sha256(self.raw)
        for d in tensor_sha256:
            h.update(d)
        return f"{TENSORS_SHA256}:{h.hexdigest()}"


def _read_header(path: Path) -> _Header:
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            (length,) = struct.unpack("<Q", raw)
            if length > os.fstat(f.fileno()).st_size - 8:
                raise ValueError(f"a header of {length} bytes does not fit in the file")
            raw += f.read(length)
        header = json.loads(raw[8:])
        ranges = {name: (8 + length + int(entry["data_offsets"][0]), 8 + length + int(entry["data_offsets"][1]))
                  for name, entry in header.items() if name != "__metadata__"}
        return _Header(raw, ranges)
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise CkaqadError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from None


def tensors_sha256(path: str | os.PathLike) -> str | None:
    """The digest run.json records for a safetensors file: ``tensors-sha256:`` and the hex SHA-256 of the file's
    header as stored (its 8-byte length and JSON) followed by the 32-byte SHA-256 of each tensor's bytes, in the
    order of the tensors in the file; None when the file is not a safetensors file whose tensors fill it.

    Where the tensors fill the file (safetensors requires it, and pack reads only files that safetensors opens), the
    header and the tensors' bytes are the whole file, so this digest fixes every byte of it as surely as the file's
    SHA-256 does (it is not the output of ``sha256sum``). Unlike that, it is computed one tensor at a time in any
    order: pack takes it from the reads it makes anyway (:meth:`SafetensorsSource.digests`).
    """
    path = Path(path)
    try:
        header = _read_header(path)
    except CkaqadError:
        return None
    if not header.tiles(path.stat().st_size):
        return None
    with open(path, "rb") as f:
        sha256 = []
        for name in header.in_file_order():
            start, stop = header.ranges[name]
            f.seek(start)
            h = hashlib.sha256()
            while start < stop and (chunk := f.read(min(stop - start, 1 << 24))):
                h.update(chunk)
                start += len(chunk)
            sha256.append(h.digest())
    return header.digest(sha256)
