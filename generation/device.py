"""Where the networks run: the device, the CPU threads, and the torchrun rank (one process or DDP,
with the same code).

Under `torchrun --nproc_per_node N`, the environment names RANK/WORLD_SIZE and we join a process
group (gloo on CPU, nccl on GPU); otherwise everything is a no-op and rank 0 of 1.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from generation.errors import InputError


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world_size
        return value

    def shard(self, count: int) -> range:
        """Indices of a dataset of `count` items that this rank handles (disjoint, covering)."""
        return range(self.rank, count, self.world_size)


def init_distributed(device: torch.device | None = None) -> Distributed:
    """Join the torchrun process group if there is one (idempotent)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_nccl = device is not None and device.type == "cuda"
        if use_nccl:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_nccl else "gloo")
        # Leave the group before the interpreter exits: a gloo group still alive at exit can abort
        # the process (SIGABRT) when its peer has already gone.
        atexit.register(_leave_process_group)
    return Distributed(rank, world_size, local_rank)


def _leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def pick_device(name: str = "auto") -> torch.device:
    """`auto` is the GPU when there is one, else the CPU; a GPU that torch cannot see is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise InputError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: torch sees no CUDA GPU here; use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    return device


PRECISIONS = ("float32", "bfloat16")


def bfloat16_supported(device: torch.device) -> bool:
    """Whether `device` computes in bfloat16 natively: a GPU that has it, or a CPU with AVX-512 BF16
    or AMX (elsewhere oneDNN emulates bfloat16, slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse, in one line, a precision that is unknown or that `device` cannot compute natively."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "bfloat16" and not bfloat16_supported(device):
        raise InputError(f"no native bfloat16 on this {'GPU' if device.type == 'cuda' else 'CPU'} (a CPU needs AVX-512 BF16 or AMX); use --precision float32")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The networks' autocast for `precision` (a no-op for float32)."""
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def is_main_process() -> bool:
    """True outside torchrun and on its rank 0: the one process that reports to the terminal."""
    return os.environ.get("RANK", "0") == "0"


def set_threads(count: int) -> None:
    """Run torch on `count` CPU threads; 0 keeps torch's default."""
    if count:
        torch.set_num_threads(count)
