"""Launch decisions as data: the grid, constexpr tile sizes, warps and stages of one kernel launch.

Each op file has a pure function per kernel, `<kernel>_config(shapes..., target) -> Launch`, that its
launcher calls and that `bench/kernel_compile.py` calls to compile the same configurations for GPUs this
machine does not have, so the compile check cannot drift from what runs.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Target:
    """Where a kernel runs: a CUDA compute capability as an int (80 = sm_80) and its SM count, or arch 0 =
    Triton's interpreter, which runs one program at a time and so prefers large tiles."""
    arch: int = 0
    num_sms: int = 1

    @property
    def interpreted(self) -> bool:
        return self.arch == 0


INTERPRETER = Target()
# The GPUs the project targets (SM counts from the vendors' spec sheets): the launch configs the
# compile check covers, and what the interpreter tests run with to check CUDA's tile sizes on CPU.
GPUS = {"sm_80": Target(80, 108),     # A100
        "sm_89": Target(89, 128),     # RTX 4090
        "sm_90": Target(90, 132),     # H100 SXM / H200
        "sm_120": Target(120, 170)}   # RTX 5090


@functools.lru_cache(maxsize=None)
def _cuda_target(index: int) -> Target:
    p = torch.cuda.get_device_properties(index)
    return Target(10 * p.major + p.minor, p.multi_processor_count)


def target_of(x: torch.Tensor) -> Target:
    """The target a launch on tensor x runs on: its CUDA device, or the interpreter for CPU tensors."""
    if not x.is_cuda:
        return INTERPRETER
    return _cuda_target(x.device.index if x.device.index is not None else torch.cuda.current_device())


@dataclass(frozen=True)
class Launch:
    """One kernel launch: `launch(kernel, *args)` runs `kernel[grid](*args, **constexprs, num_warps=...,
    num_stages=...)`. `constexprs` are the tile sizes and flags; the kernel's other arguments are data."""
    grid: tuple
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3          # Triton's default; only loops with loads are pipelined

    def __call__(self, kernel, *args) -> None:
        kernel[self.grid](*args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
