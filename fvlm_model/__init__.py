"""The foveated joint model, its prediction head, and language-model loading."""

from .heads import RECON_HEADS, FiLMPredictionHead, HiddenPredictionHead, prediction_head
from .lm import DEFAULT_LM, build_tokenizer_tiny, load_lm, smollm2_135m_config
from .model import FoveatedVLM, ModelConfig

__all__ = [
    "DEFAULT_LM",
    "FiLMPredictionHead",
    "HiddenPredictionHead",
    "RECON_HEADS",
    "prediction_head",
    "FoveatedVLM",
    "ModelConfig",
    "build_tokenizer_tiny",
    "load_lm",
    "smollm2_135m_config",
]
