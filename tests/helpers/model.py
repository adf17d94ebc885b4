"""The tiny preset's model (a real, random-initialised small Llama) with every path live, and batches for it."""

from __future__ import annotations

import torch

from fvlm_model import FoveatedVLM, load_lm
from fvlm_model.model import ModelConfig

B, T, N, D = 3, 4, 17, 32
LATENT = (4, 8, 8)
CAPTIONS = [
    "a red square moves left",
    "blue ball",
    "the video shows a big green circle that bounces slowly across the frame",
]


def make_model(seed: int = 0, fine_iterations: int = 2, recon_head: str = "film") -> FoveatedVLM:
    lm, _ = load_lm("tiny")
    torch.manual_seed(seed)
    model = FoveatedVLM(lm, ModelConfig(dino_dim=D, latent_channels=LATENT[0], latent_size=LATENT[1],
                                        fine_iterations=fine_iterations, recon_head=recon_head))
    # The FiLM layer (the other heads' last convolution) and latent init start at zero; give them
    # values so every path is live and the dependency tests (tests/test_model.py) can see a leak if there is one.
    with torch.no_grad():
        last = model.head.film if recon_head == "film" else model.head.decoder[-1]
        last.weight.normal_(std=0.5)
        model.latent_init.normal_()
    return model.eval()


def make_batch(tokenizer, captions=CAPTIONS, seed: int = 0):
    """Right-padded captions with EOS appended; labels are -100 on padding only."""
    g = torch.Generator().manual_seed(seed)
    b = len(captions)
    ids = [tokenizer(c).input_ids + [tokenizer.eos_token_id] for c in captions]
    length = max(map(len, ids))
    input_ids = torch.full((b, length), tokenizer.pad_token_id)
    labels = torch.full((b, length), -100)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(x)] = torch.tensor(x)
    dino = torch.randn(b, T, N, D, generator=g)
    latents = torch.randn(b, T, *LATENT, generator=g)
    return dino, latents, input_ids, labels
