"""Prediction head: the next VAE latent from an LM hidden state and the previous latent."""

import torch.nn as nn
from torch import Tensor


class FiLMPredictionHead(nn.Module):
    """Predict x_t from the hidden state h (before frame t) and the previous latent x_{t-1}.

    A small conv encoder turns x_{t-1} into features; h sets a per-channel scale and shift
    (FiLM); a small conv decoder maps back to a latent. The encoder is split out (`encode`) so a
    caller running several passes over the same frames encodes the previous latents once.
    All convolutions keep the spatial size, so any latent shape works.
    """

    def __init__(self, hidden_dim: int, latent_channels: int = 4, width: int = 64):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(latent_channels, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
        )
        self.film = nn.Linear(hidden_dim, 2 * width)
        self.decoder = nn.Sequential(
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, latent_channels, 3, padding=1),
        )
        # Zero-init FiLM: the head starts as a plain function of x_{t-1} (scale 1, shift 0), so
        # large pretrained hidden states cannot blow up the first steps.
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def encode(self, prev_latents: Tensor) -> Tensor:
        """[..., C, H, W] previous latents -> [..., width, H, W] features."""
        lead = prev_latents.shape[:-3]
        return self.encoder(prev_latents.flatten(0, -4)).unflatten(0, lead)

    def forward(self, hidden: Tensor, features: Tensor) -> Tensor:
        """hidden [..., hidden_dim] and features [..., width, H, W] (broadcastable leading dims,
        e.g. hidden [P, B, T, H] with features [B, T, width, H, W]) -> latents [..., C, H, W]."""
        gamma, beta = self.film(hidden).chunk(2, dim=-1)
        x = features * (1 + gamma[..., None, None]) + beta[..., None, None]
        lead = x.shape[:-3]
        return self.decoder(x.flatten(0, -4)).unflatten(0, lead)

