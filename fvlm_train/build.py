"""The model a run configuration describes, on a store's feature shapes."""

from __future__ import annotations

from typing import Any

from fvlm_data.synthetic import synthetic_vocabulary
from fvlm_model import FoveatedVLM, load_lm

from . import TrainError
from .config import RunConfig


def build_model(config: RunConfig, attrs: dict[str, Any]) -> tuple[FoveatedVLM, Any]:
    """(model, tokenizer); a LM that cannot be loaded is one line, with a hint if the store is tiny."""
    lm_id = config.lm_id
    try:
        lm, tokenizer = load_lm(lm_id, words=synthetic_vocabulary() if lm_id == "tiny" else None)
    except ValueError as e:
        hint = ""
        if attrs.get("preset") == "tiny" and lm_id != "tiny":
            hint = "; this store was made with the tiny preset: add --preset tiny to train on it offline"
        raise TrainError(f"{e}{hint}") from None
    c, h, _ = attrs["latent_shape"]
    model = FoveatedVLM(lm, dino_dim=int(attrs["dino_dim"]), latent_channels=c, latent_size=h,
                        fine_iterations=config.fine_iterations, lambda_recon=config.lambda_recon,
                        lambda_coarse=config.lambda_coarse, num_tokens=int(attrs["dino_tokens"]))
    return model, tokenizer
