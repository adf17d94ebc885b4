"""The model a run configuration describes, on a store's feature shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fvlm_data.store import FeatureStore
from fvlm_data.synthetic import synthetic_vocabulary
from fvlm_model import FoveatedVLM, ModelConfig, load_lm

from . import TrainError
from .checkpoint import Checkpoint
from .config import RunConfig, check_store, check_store_identity


def model_config(config: RunConfig, attrs: dict[str, Any]) -> ModelConfig:
    """The run's model options on the store's feature shapes (`attrs`)."""
    c, h, _ = attrs["latent_shape"]
    return ModelConfig(dino_dim=int(attrs["dino_dim"]), num_tokens=int(attrs["dino_tokens"]), latent_channels=c,
                       latent_size=h, fine_iterations=config.fine_iterations, lambda_recon=config.lambda_recon,
                       lambda_coarse=config.lambda_coarse, lambda_caption=config.lambda_caption,
                       recon_head=config.recon_head)


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
    return FoveatedVLM(lm, model_config(config, attrs)), tokenizer


def load_trained(store_path: str, checkpoint: str | Path) -> tuple[FoveatedVLM, Any, RunConfig, FeatureStore, int]:
    """(model in eval mode, tokenizer, run config, store, step) of a checkpoint on the store it was
    trained on (the analysis scripts' start); a mismatched store or checkpoint is a TrainError."""
    ckpt = Checkpoint.load(Path(checkpoint))
    store = FeatureStore.open(store_path)
    check_store(ckpt.config, store.attrs, store_path)
    check_store_identity(ckpt.config, store.attrs, store_path)
    model, tokenizer = build_model(ckpt.config, store.attrs)
    model.load_state_dict(ckpt.model)
    return model.eval(), tokenizer, ckpt.config, store, ckpt.step
