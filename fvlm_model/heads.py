"""Next-frame prediction heads: frame t's VAE latent from the LM hidden state before frame t.

Every head is called as `head(hidden, prev_latents)`: hidden [..., P, B, T, hidden_dim] (or any
leading dims that broadcast against the latents') and the previous latents [B, T, C, S, S]
(x_{t-1}; the model's learned `latent_init` for the first frame) -> latents [..., B, T, C, S, S].

  film   the seed's head: x_{t-1} through a conv encoder, scaled and shifted per channel by h (FiLM).
         Copying x_{t-1} gets it most of the way, so h barely matters (experiments/foveation/RESULTS.md).
  delta  x_{t-1} + d(h): the CHANGE is predicted from h alone, so anything beyond copying the last
         frame has to come from what the hidden state knows about where things move.
  hidden x_t from h alone: the hidden state must carry the whole frame.
"""

import math

import torch.nn as nn
from torch import Tensor

RECON_HEADS = ("film", "delta", "hidden")


class FiLMPredictionHead(nn.Module):
    """Predict x_t from the hidden state h (before frame t) and the previous latent x_{t-1}.

    A small conv encoder turns x_{t-1} into features; h sets a per-channel scale and shift
    (FiLM); a small conv decoder maps back to a latent. The previous latents have no pass
    dimension, so several passes' hidden states share one encoding of them.
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

    def forward(self, hidden: Tensor, prev_latents: Tensor) -> Tensor:
        features = self.encode(prev_latents)
        gamma, beta = self.film(hidden).chunk(2, dim=-1)
        x = features * (1 + gamma[..., None, None]) + beta[..., None, None]
        lead = x.shape[:-3]
        return self.decoder(x.flatten(0, -4)).unflatten(0, lead)


class HiddenPredictionHead(nn.Module):
    """A latent from the hidden state alone: a linear map to a coarse grid (a quarter of the latent's
    side), then two 2x upsampling convolutions; cropped to the latent's size.

    `residual` (the `delta` head) adds the result to x_{t-1}; otherwise (`hidden`) it is the
    prediction itself. The last convolution starts at zero, so `delta` starts as copying the
    previous frame and `hidden` as predicting zeros: the two baselines of
    experiments/foveation/next_frame.py.
    """

    def __init__(self, hidden_dim: int, latent_channels: int, latent_size: int, residual: bool, width: int = 64):
        super().__init__()
        self.residual, self.latent_size, self.width = residual, latent_size, width
        self.grid = math.ceil(latent_size / 4)
        self.to_grid = nn.Linear(hidden_dim, width * self.grid**2)
        self.decoder = nn.Sequential(
            nn.SiLU(),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, latent_channels, 3, padding=1),
        )
        nn.init.zeros_(self.decoder[-1].weight)
        nn.init.zeros_(self.decoder[-1].bias)

    def forward(self, hidden: Tensor, prev_latents: Tensor) -> Tensor:
        lead, s = hidden.shape[:-1], self.latent_size
        grid = self.to_grid(hidden).view(-1, self.width, self.grid, self.grid)
        out = self.decoder(grid)[..., :s, :s].unflatten(0, lead)
        return prev_latents + out if self.residual else out


def prediction_head(name: str, hidden_dim: int, latent_channels: int, latent_size: int) -> nn.Module:
    """The next-frame head called `name` (one of RECON_HEADS)."""
    if name == "film":
        return FiLMPredictionHead(hidden_dim, latent_channels)
    if name in ("delta", "hidden"):
        return HiddenPredictionHead(hidden_dim, latent_channels, latent_size, residual=name == "delta")
    raise ValueError(f"unknown next-frame head {name!r}: one of {', '.join(RECON_HEADS)}")
