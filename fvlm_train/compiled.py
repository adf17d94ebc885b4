"""The compiled training step: few graphs (caption lengths padded to two buckets), CUDA graphs on
CUDA unless they fail (then one line and plain compilation), and the run's total compile time."""

from __future__ import annotations

import time
from typing import Any

import click
import torch

from .step import train_step


def caption_bucket(batch: dict[str, Any], max_caption_tokens: int) -> int:
    """The padded caption length of a batch: half of --max-caption-tokens, or all of it. Two shapes,
    so at most two compiled graphs, at the cost of padding (masked, never learned: it changes no loss)."""
    half = max(1, max_caption_tokens // 2)
    return half if batch["input_ids"].shape[1] <= half else max_caption_tokens


class CompiledStep:
    """`train_step` through `torch.compile(fn)`; `mode="reduce-overhead"` (CUDA graphs) on CUDA with one
    micro-batch per step. With gradient accumulation CUDA graphs are off: cudagraph trees hand the first
    micro-batch's gradients to `.grad` without a copy and the next replay overwrites them, which gives
    wrong accumulated gradients or an error (pytorch/pytorch#169545, #96693)."""

    def __init__(self, fn: torch.nn.Module, device: torch.device, grad_accum: int = 1) -> None:
        self.plain, self.cuda_graphs = fn, device.type == "cuda" and grad_accum == 1
        if device.type == "cuda" and grad_accum > 1:
            click.echo(f"--compile: no CUDA graphs with --grad-accum {grad_accum} (they corrupt accumulated "
                       "gradients); --grad-accum 1 with a larger --batch-size gives the same update with them",
                       err=True)
        self.fn = torch.compile(fn, dynamic=False, mode="reduce-overhead" if self.cuda_graphs else None)
        self.compile_s = 0.0

    def step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro: list[dict[str, Any]],
             clip: float, world: int) -> dict[str, Any]:
        """One step (device results, nothing read back); the time of steps that compiled a graph is
        counted as compile time."""
        stats = torch._dynamo.utils.counters["stats"]
        before, t0 = stats["unique_graphs"], time.perf_counter()
        try:
            result = train_step(model, self.fn, optimizer, micro, clip, world, read=False)
        except Exception as e:  # CUDA graphs that do not hold here: compile without them
            if not self.cuda_graphs:
                raise
            click.echo(f"--compile: CUDA graphs failed ({type(e).__name__}: {' '.join(str(e).split())[:160]}); "
                       "compiling without them", err=True)
            optimizer.zero_grad(set_to_none=True)
            torch._dynamo.reset()
            self.cuda_graphs = False
            self.fn = torch.compile(self.plain, dynamic=False)
            return self.step(model, optimizer, micro, clip, world)
        if stats["unique_graphs"] > before:
            self.compile_s += time.perf_counter() - t0
        return result

    def summary(self) -> str:
        counters = torch._dynamo.utils.counters
        skips = int(counters["inductor"]["cudagraph_skips"])
        graphs = "CUDA graphs" + (f" (skipped for {skips} graph(s): see the log above)" if skips else "") \
            if self.cuda_graphs else "no CUDA graphs"
        return (f"compiled {int(counters['stats']['unique_graphs'])} graph(s) in {self.compile_s:.1f} s "
                f"(the steps that compiled), {graphs}")
