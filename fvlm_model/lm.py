"""Language model and tokenizer loading: the real hub model, or an offline `tiny` preset.

The `tiny` preset is a random-initialised small Llama plus a WordPiece tokenizer built in memory,
so tests, CI and demos run with no network. Both are deterministic: the same words give the same
vocabulary and the same weights.
"""

import os
import string

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from fvlm_data.environment import hub_reachable

DEFAULT_LM = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY = "tiny"
CAUSAL_SDPA = "fvlm_causal_sdpa"  # the attention implementation every LM loaded here uses

PAD, UNK, EOS = "<pad>", "<unk>", "<|endoftext|>"
# Single characters: any lowercase ascii word splits into these, so ascii text never becomes <unk>.
_CHARS = string.ascii_lowercase + string.digits + string.punctuation

# Used when the caller does not pass the synthetic source's vocabulary.
DEFAULT_WORDS = [
    "a", "an", "the", "is", "are", "of", "in", "on", "to", "and", "with", "at", "from", "by",
    "this", "that", "it", "its", "video", "shows", "red", "green", "blue", "yellow", "white",
    "black", "orange", "purple", "gray", "square", "circle", "triangle", "ball", "box", "shape",
    "dot", "line", "moves", "moving", "left", "right", "up", "down", "across", "slowly", "quickly",
    "fast", "slow", "bounces", "rotates", "grows", "shrinks", "small", "large", "big", "tiny",
    "background", "frame", "scene", "object",
]


def causal_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs: object) -> tuple[torch.Tensor, None]:
    """Causal attention as SDPA's fast kernels want it, eager and compiled alike: `is_causal=True` and
    no mask tensor, K/V heads shared natively (`enable_gqa`, no `repeat_kv`).

    transformers makes no mask for an attention implementation it has no mask function for, so this
    one never gets one: this project never pads on the left and never passes a padding mask (right
    padding is causal-masked from every real position). A query of one token after a cache attends
    to everything; a longer chunk after a cache gets the lower-right causal mask (not used here)."""
    if attention_mask is not None:
        raise ValueError(f"{CAUSAL_SDPA} takes no attention mask (this project passes none)")
    q_len, kv_len = query.shape[2], key.shape[2]
    mask, causal = None, q_len > 1
    if causal and kv_len != q_len:
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        causal = False
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                         is_causal=causal, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(CAUSAL_SDPA, causal_sdpa_attention)


def use_causal_sdpa(model: PreTrainedModel) -> PreTrainedModel:
    """Switch a loaded LM to `causal_sdpa_attention` (same weights, same results as "sdpa")."""
    model.set_attn_implementation(CAUSAL_SDPA)
    return model


def build_tokenizer_tiny(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """An offline WordPiece tokenizer: each of `words` is one token, anything else spells out.

    Vocabulary order: special tokens, the words (lower-cased, first occurrence wins), the single
    characters, then their `##` continuations. No EOS is appended automatically (like SmolLM2's
    tokenizer); the collate appends `eos_token_id` itself.
    """
    words = DEFAULT_WORDS if words is None else words
    vocab: dict[str, int] = {}
    for token in [PAD, UNK, EOS]:
        vocab.setdefault(token, len(vocab))
    pre = pre_tokenizers.BertPreTokenizer()
    for word in words:
        word = word.lower().strip()
        # Only whole words survive pre-tokenisation as one piece; "don't" would never match.
        if word and [w for w, _ in pre.pre_tokenize_str(word)] == [word]:
            vocab.setdefault(word, len(vocab))
    for ch in _CHARS:
        vocab.setdefault(ch, len(vocab))
    for ch in _CHARS:
        vocab.setdefault("##" + ch, len(vocab))

    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=UNK, max_input_chars_per_word=200))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()]
    )
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, eos_token=EOS, padding_side="right"
    )


def tiny_llama_config(vocab_size: int) -> LlamaConfig:
    """A small Llama (128 wide, 2 layers) for tests and laptop demos."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    )


def smollm2_135m_config() -> LlamaConfig:
    """A LlamaConfig shaped like SmolLM2-135M, for benchmarks without the hub."""
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        initializer_range=0.041666666666666664,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def _ensure_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token distinct from EOS.

    Padding is masked with -100 labels anyway, but a pad id equal to EOS invites the reference's
    mistake of ignoring EOS. Prefer an existing token (SmolLM2: `<|endoftext|>` is unk, EOS is
    `<|im_end|>`) so the embedding matrix keeps its shape.
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
    else:
        tokenizer.add_special_tokens({"pad_token": PAD})
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name and os.sep != "/"


def _load_pretrained(name: str) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """From a local folder, the local hub cache, or the hub; ValueError with what to do otherwise."""
    def load(local_only: bool) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
        # Explicit float32: training runs the weights in fp32 under bf16 autocast.
        return tokenizer, AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, local_files_only=local_only)

    if _looks_like_path(name) and not os.path.isdir(os.path.expanduser(name)):
        raise ValueError(f"cannot load language model {name!r}: no such folder (give a local model folder or a "
                         f"hub id such as {DEFAULT_LM})")
    try:
        return load(local_only=True)
    except Exception as e:  # not cached (or not a model folder): try the hub below
        cached_error = e
    if os.path.isdir(os.path.expanduser(name)):
        reason = (str(cached_error).strip().splitlines() or [type(cached_error).__name__])[0]
        raise ValueError(f"cannot load language model {name!r}: {reason}") from None
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or not hub_reachable():
        where = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") else \
            "the hub cannot be reached from here"
        raise ValueError(f"cannot load language model {name!r}: it is not in the local Hugging Face cache and "
                         f"{where}; download it once where there is network (then HF_HUB_OFFLINE=1 uses the "
                         "cache), or give --lm PATH to a local copy") from None
    try:
        return load(local_only=False)
    except Exception as e:  # hub/network/format errors come in many types
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"cannot load language model {name!r}: {reason}") from None


def load_lm(
    name_or_preset: str = DEFAULT_LM, words: list[str] | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer (float32, right padding, pad != EOS).

    `"tiny"` builds the offline preset (`words` sets its vocabulary); anything else is a hub id or
    a local directory. Failure raises ValueError with a one-line reason.
    """
    if name_or_preset == TINY:
        tokenizer = build_tokenizer_tiny(words)
        config = tiny_llama_config(len(tokenizer))
        config.pad_token_id = tokenizer.pad_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.bos_token_id = None
        config.name_or_path = TINY
        # Seed inside a forked RNG: same weights every call, caller's RNG stream untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
        return use_causal_sdpa(model), tokenizer

    tokenizer, model = _load_pretrained(name_or_preset)
    tokenizer.padding_side = "right"
    _ensure_pad_token(model, tokenizer)
    return use_causal_sdpa(model), tokenizer
