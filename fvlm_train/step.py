"""The training step and what it is made of: AdamW with one weight-decay rule, the learning-rate
schedule, the step itself (the one function the loop runs, the benchmark times and the tests
check), its compiled form, and a counter of reads back to the host."""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import click
import torch

from .distributed import all_sum

# Vectors and lookup tables: decaying them pulls queries/embeddings/norm gains towards 0, which
# is not a regulariser of anything. Matched by parameter name, checked by test_weight_decay_rule in
# tests/test_train_parts.py.
NO_DECAY_NAMES = ("q_static", "q_init", "latent_init", "mode_embed", "embed_tokens", "lm_head", "norm", "bias")


def decays(name: str, param: torch.nn.Parameter) -> bool:
    """The rule: weight matrices of linear and convolution layers decay; queries, embeddings,
    norms, biases and the learned initial latent (`latent_init`, `q_init`) do not."""
    return param.ndim >= 2 and not any(part in name for part in NO_DECAY_NAMES)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if decays(n, p)], "weight_decay": weight_decay},
              {"params": [p for n, p in params if not decays(n, p)], "weight_decay": 0.0}]
    # Fused (CUDA and CPU): its `found_inf` lets train_step skip a non-finite step without reading
    # the flag back to the host.
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)


def lr_at(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak at `total` steps."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# What a step sums over its videos (fvlm_model.evaluation.pass_metrics turns sums into metrics).
SUMS = ("cap_sum_coarse", "cap_sum_fine", "cap_tokens", "rec_sum_coarse", "rec_sum_fine", "videos")


def train_step(model: torch.nn.Module, fn: Callable[..., dict[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
               micro_batches: list[dict[str, Any]], clip: float, world: int = 1, read: bool = True) -> dict[str, Any]:
    """One optimiser step over `micro_batches` (already on the device): forward and backward of
    each, gradient clipping, and AdamW if the losses and the gradient norm are finite on every rank.

    `fn` is what runs the forward: the model, its DDP wrapper or a compiled version of either.
    Every micro-batch's loss is normalised by the caption tokens and videos of the whole step
    (all micro-batches, all ranks), so accumulation over K micro-batches gives the gradient of one
    batch of all of them. Returns this rank's `sums` (SUMS), `grad_norm`, `loss` (this step's loss
    on this rank's share) and `finite`.

    Nothing is read back to the host: the counts are built on the device, and a non-finite step is
    skipped by the fused AdamW's `found_inf` (its update and step count are left as they were), the
    same flag on every rank. With `read` (the default) the results come back as float64 CPU sums,
    floats and a bool (one sync); the loop passes read=False and reads them only when it logs.
    """
    device = micro_batches[0]["labels"].device
    tokens = sum((b["labels"] != -100).sum() for b in micro_batches).float()
    videos = torch.full((), float(sum(b["labels"].shape[0] for b in micro_batches)), device=device)
    # DDP averages gradients over ranks: each rank normalises by the global totals / world.
    tokens, videos = (all_sum(torch.stack([tokens, videos]), world) / world).unbind()
    sums = torch.zeros(len(SUMS), device=device, dtype=torch.float64)
    loss = torch.zeros((), device=device)
    use_bf16 = device.type == "cuda"
    for i, b in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        no_sync = fn.no_sync() if (world > 1 and not last) else contextlib.nullcontext()
        with no_sync, torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            # The batch's tensors as one mapping (its strings stay out of what a compiled step is given).
            out = fn({k: v for k, v in b.items() if torch.is_tensor(v)}, cap_tokens=tokens, num_videos=videos)
        # Always backward, even a non-finite loss: DDP ranks must all join the gradient all-reduce.
        out["loss"].backward()
        loss += out["loss"].detach().float()
        cap, rec = out["cap_sum"].sum(1), out["rec_per_sample"].sum(1)
        n = torch.full((), float(b["labels"].shape[0]), device=device)
        sums += torch.stack([cap[0], cap[-1], out["cap_tokens"].sum(), rec[0], rec[-1], n]).double()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    bad = (~torch.isfinite(loss) | ~torch.isfinite(grad_norm)).float()
    found_inf = (all_sum(bad.reshape(1), world) > 0).float().reshape(())  # every rank skips together
    optimizer.found_inf = found_inf  # fused AdamW skips the whole update where it is 1
    optimizer.step()
    optimizer.found_inf = None
    optimizer.zero_grad(set_to_none=True)
    finite = found_inf == 0
    if not read:
        return {"sums": sums, "grad_norm": grad_norm, "loss": loss, "finite": finite}
    return {"sums": sums.cpu(), "grad_norm": float(grad_norm), "loss": float(loss), "finite": bool(finite)}


def random_batch(vocab_size: int, batch: int, frames: int, tokens: int, dino_dim: int, latent_shape: tuple[int, ...],
                 caption_tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random features and captions of random lengths, laid out as CaptionCollator lays a batch out
    (right-padded, labels -100): what the step benchmark times and the equivalence tests step on."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch, caption_tokens), generator=g)
    lengths = torch.randint(max(1, caption_tokens // 2), caption_tokens + 1, (batch,), generator=g)
    lengths[0] = caption_tokens  # the longest caption fills the padded length, as the collate pads
    pad = torch.arange(caption_tokens)[None] >= lengths[:, None]
    return {
        "dino": torch.randn(batch, frames, tokens, dino_dim, generator=g),
        "latents": torch.randn(batch, frames, *latent_shape, generator=g),
        "input_ids": ids.masked_fill(pad, 0),
        "labels": ids.masked_fill(pad, -100),
    }


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


READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


@contextlib.contextmanager
def count_host_reads() -> Iterator[Counter]:
    """Inside: every `.item()`, `.tolist()`, `.cpu()`, `.numpy()`, `float()`, `int()`, `bool()` of a
    tensor is counted by name (on a CPU run too, where it stands for the sync it would be on a GPU)."""
    counts: Counter = Counter()
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name: str, original):  # noqa: ANN001, ANN202
        def read(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            counts[name] += 1
            return original(self, *args, **kwargs)
        return read

    for name, original in saved.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield counts
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)
