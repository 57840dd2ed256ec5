"""Reading PyTorch-world checkpoints as NumPy, lazily and without running code.

Formats: ``.safetensors`` (one file, or shards with ``*.safetensors.index.json``), PyTorch ``.bin``
(one file or shards with ``pytorch_model.bin.index.json``) and ``.pth``/``.pt``. Safetensors files
are parsed here directly (header + memory map, bfloat16 through ``ml_dtypes``), so converting a
safetensors checkpoint needs no PyTorch. Pickled files go through ``torch.load(weights_only=True)``:
a checkpoint must never execute code, and one that tries is refused with a clear error.
"""

from __future__ import annotations

import json
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import ml_dtypes
import numpy as np

from segllm_jax.errors import CheckpointError

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: np.dtype
    file: Path


class TensorSource(Mapping[str, TensorInfo]):
    """Key -> metadata of every tensor in a checkpoint; ``load(key)`` reads one tensor as NumPy."""

    def __init__(self, infos: dict[str, TensorInfo], loaders: dict[Path, Callable[[str], np.ndarray]]):
        self._infos = infos
        self._loaders = loaders

    def __getitem__(self, key: str) -> TensorInfo:
        return self._infos[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def load(self, key: str) -> np.ndarray:
        info = self._infos[key]
        return self._loaders[info.file](key)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(i.shape)) * i.dtype.itemsize for i in self._infos.values())


def _read_safetensors(path: Path) -> tuple[dict[str, TensorInfo], Callable[[str], np.ndarray]]:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated: it ends inside the safetensors header.")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise CheckpointError(f"{path} is truncated: its header says {n} bytes, the file has {size - 8}.")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} is not a safetensors file (its header is not JSON).") from None
    header.pop("__metadata__", None)
    infos: dict[str, TensorInfo] = {}
    spans: dict[str, tuple[int, int]] = {}
    for key, meta in header.items():
        if meta["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {meta['dtype']}.")
        dtype = np.dtype(_SAFETENSORS_DTYPES[meta["dtype"]])
        begin, end = meta["data_offsets"]
        if 8 + n + end > size:
            raise CheckpointError(f"{path} is truncated: tensor {key!r} ends at byte {8 + n + end}, "
                                  f"the file has {size}.")
        infos[key] = TensorInfo(tuple(meta["shape"]), dtype, path)
        spans[key] = (8 + n + begin, 8 + n + end)
    data = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)

    def load(key: str) -> np.ndarray:
        begin, end = spans[key]
        info = infos[key]
        return np.asarray(data[begin:end]).view(info.dtype).reshape(info.shape)

    return infos, load


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _read_pickle(path: Path) -> tuple[dict[str, TensorInfo], Callable[[str], np.ndarray]]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path} is a PyTorch pickle; reading it needs `pip install torch==2.13.0` "
                              "(or convert the checkpoint to safetensors).") from None
    import pickle
    import zipfile

    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols are not for the user
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        # torch's own message advises retrying with weights_only=False, i.e. running the file's code:
        # never pass that on; name only what the file asked for
        found = re.search(r"GLOBAL\s+([\w.]+)", str(e))
        what = f" (it asks for {found.group(1)})" if found else ""
        raise CheckpointError(f"{path} was refused: loading it would run code or build non-tensor objects{what}; "
                              "only plain tensor checkpoints are read, so ask for a safetensors file.") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path} cannot be read as a PyTorch checkpoint; it may be truncated "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]}).") from None
    # training checkpoints often wrap the state dict: {"model": {...}} or {"state_dict": {...}}
    while isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in ("model", "state_dict", "module"):
        obj = next(iter(obj.values()))
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors.")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    others = sorted(k for k in obj if k not in tensors)
    if others:
        raise CheckpointError(f"{path} holds entries that are not tensors: {', '.join(map(str, others))}.")
    infos = {k: TensorInfo(tuple(v.shape), _torch_to_numpy(v[:0] if v.dim() else v).dtype, path)
             for k, v in tensors.items()}
    return infos, lambda key: _torch_to_numpy(tensors[key])


def _reader_for(path: Path):
    if path.suffix == ".safetensors":
        return _read_safetensors
    if path.suffix in (".bin", ".pth", ".pt"):
        return _read_pickle
    raise CheckpointError(f"{path}: unknown checkpoint format {path.suffix!r}; "
                          "expected .safetensors, .bin, .pth or .pt.")


def _files_in(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise CheckpointError(f"{index} is not a valid shard index (no 'weight_map').") from None
            files = sorted({folder / f for f in weight_map.values()})
            missing = [str(f.name) for f in files if not f.exists()]
            if missing:
                raise CheckpointError(f"{index} names shards that are missing: {', '.join(missing)}.")
            return files
    for pattern in ("*.safetensors", "*.bin", "*.pth", "*.pt"):
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise CheckpointError(f"{folder} holds no checkpoint (.safetensors, .bin, .pth or .pt).")


def open_checkpoint(path: str | Path) -> TensorSource:
    """All tensors of a checkpoint file or folder, read lazily. Duplicate keys across shards are an error."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder; pass a checkpoint folder or a .safetensors, "
                              ".bin or .pth file.")
    files = _files_in(path) if path.is_dir() else [path]
    infos: dict[str, TensorInfo] = {}
    loaders: dict[Path, Callable[[str], np.ndarray]] = {}
    for file in files:
        file_infos, loader = _reader_for(file)(file)
        dupes = sorted(set(file_infos) & set(infos))
        if dupes:
            raise CheckpointError(f"{file} repeats keys of another shard: {', '.join(dupes)}.")
        infos.update(file_infos)
        loaders[file] = loader
    return TensorSource(infos, loaders)
