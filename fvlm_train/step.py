"""The training step: the one function the loop runs, the benchmark times and the tests check."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from .distributed import all_sum

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
            out = fn(b["dino"], b["latents"], b["input_ids"], b["labels"], cap_tokens=tokens, num_videos=videos)
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
