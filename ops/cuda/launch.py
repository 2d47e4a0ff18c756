"""Kernel launches shared by the GPU and the CPU emulation: arguments as cuLaunchKernel takes them.

A kernel module, compiled for a GPU (``ops.nvrtc.GpuModule``) or for the CPU emulation
(``ops.cuda.emulation.EmulatedModule``), offers the same two members:

    module.names                          the name expressions it was compiled with
    module.launch(name, grid, block, shared_bytes, args, stream=0)

``name`` is a name expression such as ``"msda::forward_kernel<float, true>"``; ``grid`` and
``block`` are 3-tuples; ``args`` is a :class:`KernelArgs` built from ctypes values, one per kernel
parameter in order (``pointer(tensor)`` for pointers, ``ctypes.c_int``/``c_int64``/``c_float`` for
scalars, a ``ctypes.Structure`` for a struct passed by value); ``stream`` is a CUDA stream handle
(ignored by the emulation). So a launcher written once against this interface runs on both, and the
emulation exercises the very argument packing the GPU receives.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Protocol

import torch


class KernelArgs:
    """cuLaunchKernel's ``void** kernelParams``: an array of pointers to each argument's bytes.

    Keeps the ctypes values alive as long as the array; ``sizes`` lets the emulation check every
    argument's size against the kernel's parameter types.
    """

    def __init__(self, values: Sequence[ctypes._SimpleCData | ctypes.Structure]) -> None:
        for i, v in enumerate(values):
            if not isinstance(v, (ctypes._SimpleCData, ctypes.Structure)):
                raise TypeError(f"kernel argument {i} must be a ctypes value or Structure, got {type(v).__name__}")
        self.values = list(values)
        n = len(self.values)
        self.array = (ctypes.c_void_p * n)(*[ctypes.addressof(v) for v in self.values])
        self.sizes = (ctypes.c_uint * n)(*[ctypes.sizeof(v) for v in self.values])

    def __len__(self) -> int:
        return len(self.values)

    @property
    def address(self) -> int:
        """The ``void**`` as an integer, for cuLaunchKernel or the emulation."""
        return ctypes.addressof(self.array)


def pointer(tensor: torch.Tensor | None) -> ctypes.c_void_p:
    """A tensor's data pointer as a kernel argument (NULL for None or an empty tensor)."""
    if tensor is None or tensor.numel() == 0:
        return ctypes.c_void_p(None)
    return ctypes.c_void_p(tensor.data_ptr())


class KernelModule(Protocol):
    names: tuple[str, ...]

    def launch(
        self,
        name: str,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        shared_bytes: int,
        args: KernelArgs,
        stream: int = 0,
    ) -> None: ...


def launch(
    module: KernelModule,
    device: torch.device,
    name: str,
    geometry: tuple[tuple[int, int, int], tuple[int, int, int], int],
    tensors: Sequence[torch.Tensor | None],
    dims: ctypes.Structure,
) -> None:
    """Launch ``name`` with the tensors' pointers and then ``dims`` as its arguments: on the current
    stream of ``device`` when it is a GPU, else (a CPU tensor's device) in the emulation."""
    grid, block, shared_bytes = geometry
    args = KernelArgs([*[pointer(t) for t in tensors], dims])
    if device.type == "cuda":
        with torch.cuda.device(device):
            module.launch(name, grid, block, shared_bytes, args, torch.cuda.current_stream(device).cuda_stream)
    else:
        module.launch(name, grid, block, shared_bytes, args)
