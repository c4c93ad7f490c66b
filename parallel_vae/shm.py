"""Named CPU shared memory for weights, latents and result slots.

The parent creates every block (``create``) and so owns it: Python's resource tracker unlinks it
if the parent is killed. Workers only ``attach`` by name, without registering the block with a
tracker of their own (a worker's tracker would unlink the parent's block when the worker exits).
"""
from __future__ import annotations

import mmap
import os
import uuid
from multiprocessing import shared_memory
from typing import Mapping

import torch

try:  # POSIX: map by name without the resource tracker
    import _posixshmem
except ImportError:  # pragma: no cover - Windows
    _posixshmem = None

ALIGN = 64


def create(nbytes: int, tag: str = "blk") -> shared_memory.SharedMemory:
    name = f"pvae_{os.getpid()}_{tag}_{uuid.uuid4().hex[:10]}"
    return shared_memory.SharedMemory(name=name, create=True, size=max(1, nbytes))


def release(block) -> None:
    """Close and unlink a block the parent created; safe to call twice."""
    if block is None:
        return
    try:
        block.close()
    except BufferError:  # a tensor view still exists; the mapping goes when it does
        pass
    try:
        block.unlink()
    except FileNotFoundError:
        pass


class Attached:
    """A worker's mapping of a parent's block (``buf`` is writable)."""

    def __init__(self, name: str, nbytes: int):
        self.name = name
        if _posixshmem is not None:
            fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
            try:
                self._mmap = mmap.mmap(fd, nbytes)
            finally:
                os.close(fd)
            self.buf = memoryview(self._mmap)
            self._shm = None
        else:  # pragma: no cover
            self._shm = shared_memory.SharedMemory(name=name)
            self.buf = self._shm.buf

    def close(self) -> None:
        try:
            self.buf.release()
            if self._shm is not None:
                self._shm.close()
            else:
                self._mmap.close()
        except BufferError:  # tensors still view it; freed with them
            pass


def view(buf, dtype: torch.dtype, shape, offset: int = 0) -> torch.Tensor:
    """A tensor over ``buf`` (no copy)."""
    numel = 1
    for n in shape:
        numel *= n
    if numel == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype, count=numel, offset=offset).view(tuple(shape))


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def pack(tensors: Mapping[str, torch.Tensor], tag: str = "w"):
    """Copy tensors into one new block: (block, manifest of (key, dtype, shape, offset))."""
    items = [(k, t.detach()) for k, t in tensors.items()]
    total = sum(_aligned(t.numel() * t.element_size()) for _, t in items)
    block = create(total, tag)
    manifest, offset = [], 0
    try:
        for key, t in items:
            view(block.buf, t.dtype, t.shape, offset).copy_(t)
            manifest.append((key, t.dtype, tuple(t.shape), offset))
            offset += _aligned(t.numel() * t.element_size())
    except BaseException:
        release(block)
        raise
    return block, manifest


def unpack(buf, manifest) -> dict[str, torch.Tensor]:
    """Tensors over ``buf`` as ``pack`` laid them out (views: copy them before the block closes)."""
    return {key: view(buf, dtype, shape, offset) for key, dtype, shape, offset in manifest}
