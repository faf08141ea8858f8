"""Pieces every training loop shares: the result every trainer returns, graceful stop on signals,
gradient averaging under torchrun, and the metrics file (one JSON object per line, appended)."""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as torch_dist
from torch import nn

from generation.device import Distributed


@dataclass
class TrainResult:
    """What one training run did; every trainer returns one."""

    steps: int  # optimiser steps done in total (including those of a resumed run)
    seconds: float  # wall time of this call
    out: Path  # the bundle folder written into
    stopped_early: bool  # stopped by a signal or `stop_after`; the checkpoint resumes it
    metrics: dict[str, Any] = field(default_factory=dict)  # the trainer's final figures, e.g. the last logged window


class StopFlag:
    """First SIGINT/SIGTERM: finish the current step, checkpoint, stop. Second SIGINT: abort now."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, dist: Distributed, device: torch.device) -> bool:
        """True on every rank once any rank was asked to stop (so all ranks stop at the same step)."""
        return dist.all_reduce_mean(torch.tensor(float(self.requested), device=device)).item() > 0


def autocast(device: torch.device, bf16: bool):
    """bfloat16 autocast on CUDA when `bf16` (no loss scaling: bfloat16 keeps float32's exponent
    range); elsewhere, or without `bf16`, plain float32."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")


def average_gradients(modules: Iterable[nn.Module], dist: Distributed) -> None:
    """Average .grad over ranks with one all-reduce, then clean NaN/inf so one bad batch cannot kill a run."""
    params = [p for module in modules for p in module.parameters() if p.grad is not None]
    if dist.enabled and params:
        flat = torch.cat([p.grad.flatten() for p in params]) / dist.world_size
        torch_dist.all_reduce(flat)
        for p, g in zip(params, torch.split(flat, [p.numel() for p in params])):
            p.grad.copy_(g.view_as(p))
    for p in params:
        torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)


def optimise(module: nn.Module, optimiser: torch.optim.Optimizer, loss: torch.Tensor | None, dist: Distributed) -> None:
    """One update of `module`: the gradients of `loss` (or, with None, those already accumulated by
    the caller's backward passes), averaged over ranks."""
    if loss is not None:
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
    average_gradients([module], dist)
    optimiser.step()


def broadcast_module(module: nn.Module, dist: Distributed) -> None:
    """Give every rank rank 0's weights and buffers."""
    if dist.enabled:
        for tensor in list(module.parameters()) + list(module.buffers()):
            torch_dist.broadcast(tensor.data, src=0)


def assert_same_weights(modules: Iterable[nn.Module], dist: Distributed, buffers: bool = False) -> None:
    """Under DDP, assert that every rank holds the same parameters (and buffers, if asked): a cheap
    checksum per module, compared by min/max over ranks."""
    if not dist.enabled:
        return
    sums = torch.stack([torch.stack([t.detach().double().sum() for t in [*m.parameters(), *(m.buffers() if buffers else ())]]).sum()
                        for m in modules])
    low, high = sums.clone(), sums.clone()
    torch_dist.all_reduce(low, op=torch_dist.ReduceOp.MIN)
    torch_dist.all_reduce(high, op=torch_dist.ReduceOp.MAX)
    assert torch.equal(low, high), f"ranks diverged: weight checksums {low.tolist()} vs {high.tolist()}"


def append_metrics(path: Path, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(entry) + "\n")


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
