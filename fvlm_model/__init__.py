"""The foveated joint model, its next-frame prediction heads, and language-model loading."""

from .heads import RECON_HEADS, FiLMPredictionHead, HiddenPredictionHead, prediction_head
from .lm import DEFAULT_LM, build_tokenizer_tiny, load_lm, smollm2_135m_config
from .model import FoveatedVLM, ModelConfig

__all__ = [
    "DEFAULT_LM",
    "RECON_HEADS",
    "FiLMPredictionHead",
    "FoveatedVLM",
    "HiddenPredictionHead",
    "ModelConfig",
    "build_tokenizer_tiny",
    "load_lm",
    "prediction_head",
    "smollm2_135m_config",
]
