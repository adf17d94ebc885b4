"""AdamW with one weight-decay rule, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

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
