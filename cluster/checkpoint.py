"""Reading Hugging Face checkpoints: config.json + (sharded) safetensors.

Tensors are read by byte range with pread, straight from the offsets in each
file's safetensors header: a worker that loads 1 expert of 8 reads about 1/8 of
the expert bytes, and one expert of a fused [E, ...] tensor is one contiguous
range of it. (safetensors' own mmap reader made the kernel read ahead about 4x
the bytes asked for on this machine, so we parse the small header ourselves.)
A single pread returns at most 2 GiB on Linux, so reads loop until done.
Pickled weights (.bin/.pt/.pth) are refused; nothing is ever unpickled.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import torch

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    "F4": torch.uint8,  # E2M1 pairs: the header counts values, a byte holds two (read as packed bytes)
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAX_HEADER = 100 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and tensor."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def _read_header(path: Path) -> dict[str, TensorInfo]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", raw)
        if size > _MAX_HEADER:
            raise CheckpointError(f"{path}: not a safetensors file (header of {size} bytes)")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    file_size = path.stat().st_size
    infos = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta.get("dtype") not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {meta.get('dtype')!r}")
        begin, end = meta["data_offsets"]
        start = 8 + size + begin
        if end < begin or 8 + size + end > file_size:
            raise CheckpointError(f"{path}: tensor {name!r} lies outside the file (truncated checkpoint?)")
        shape = tuple(meta["shape"])
        if meta["dtype"] == "F4":
            shape = (*shape[:-1], shape[-1] // 2)
        infos[name] = TensorInfo(path, _DTYPES[meta["dtype"]], shape, start, end - begin)
    return infos


def _weight_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({root / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index}: shard(s) listed but missing: {', '.join(missing)}")
        return files
    files = sorted(root.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in root.iterdir() if p.suffix in _PICKLED)
    if pickled:
        raise CheckpointError(
            f"{root}: only pickled weights found ({', '.join(pickled)}); moe-cluster loads safetensors only "
            "and never unpickles. Convert them once with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir)")
    raise CheckpointError(f"{root}: no *.safetensors weights found")


def pread_exact(fd: int, buf: memoryview, offset: int) -> int:
    """Fill `buf` from `offset`, looping over short reads (one pread returns at most 2 GiB).
    Returns the bytes read: less than len(buf) only at end of file."""
    done = 0
    while done < len(buf):
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got <= 0:
            break
        done += got
    return done


class Checkpoint:
    """A checkpoint directory: its config.json and a lazy view of its tensors."""

    def __init__(self, path: str | os.PathLike):
        self.root = Path(path)
        if not self.root.is_dir():
            raise CheckpointError(f"{self.root}: checkpoint directory not found")
        config_path = self.root / "config.json"
        if not config_path.exists():
            raise CheckpointError(f"{config_path}: missing (a Hugging Face checkpoint needs config.json)")
        try:
            self.config: dict = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
        self.tensors: dict[str, TensorInfo] = {}
        for file in _weight_files(self.root):
            self.tensors.update(_read_header(file))
        self.bytes_read = 0

    def has(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise CheckpointError(f"{self.root}: tensor {name!r} not found in the checkpoint")
        return self.tensors[name]

    def view_stacked(self, name: str, parts: int) -> None:
        """Read a [parts * n, ...] tensor as [parts, n, ...] from now on (the same bytes), so that
        `index` reads one part: DBRX stores its experts as row blocks of one 2-D tensor."""
        info = self.info(name)
        if info.shape and info.shape[0] == parts and len(info.shape) > 2:
            return  # already viewed so
        if not info.shape or info.shape[0] % parts:
            raise CheckpointError(f"{info.file}: tensor {name!r} of shape {list(info.shape)} does not split into "
                                  f"{parts} row blocks")
        self.tensors[name] = replace(info, shape=(parts, info.shape[0] // parts, *info.shape[1:]))

    def read_raw(self, name: str, index: int | None = None) -> torch.Tensor:
        """The tensor as stored (its own dtype, on the CPU); `index` reads only row `index` of dim 0
        (one expert of a fused [E, ...] tensor)."""
        info = self.info(name)
        shape, start, nbytes = info.shape, info.start, info.nbytes
        if index is not None:
            if not info.shape or not 0 <= index < info.shape[0]:
                raise CheckpointError(f"{info.file}: tensor {name!r} of shape {list(info.shape)} has no row {index}")
            nbytes = info.nbytes // info.shape[0]
            shape, start = info.shape[1:], info.start + index * nbytes
        buf = torch.empty(nbytes, dtype=torch.uint8)
        fd = os.open(info.file, os.O_RDONLY)
        try:
            got = pread_exact(fd, memoryview(buf.numpy()), start) if nbytes else 0
        finally:
            os.close(fd)
        if got != nbytes:
            raise CheckpointError(f"{info.file}: short read of tensor {name!r} ({got}/{nbytes} bytes)")
        self.bytes_read += nbytes
        if math.prod(shape) == 0:
            return torch.empty(shape, dtype=info.dtype)
        return buf.view(info.dtype).reshape(shape)

    def check_shape(self, name: str, shape: tuple[int, ...], index: int | None = None) -> None:
        info = self.info(name)
        stored = info.shape if index is None else info.shape[1:]
        if stored != tuple(shape):
            what = f"tensor {name!r}" + (f" (row {index})" if index is not None else "")
            raise CheckpointError(f"{info.file}: {what} has shape {list(stored)}, config.json implies {list(shape)}")

    def read(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, device: str = "cpu",
             index: int | None = None) -> torch.Tensor:
        """Read one tensor, checking it has the shape the config implies; the raw bytes move to
        `device` first and are converted there (one tensor at a time, no host copy in `dtype`)."""
        self.check_shape(name, shape, index)
        return self.read_raw(name, index).to(device).to(dtype)
