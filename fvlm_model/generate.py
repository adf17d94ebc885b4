"""Caption generation with the foveated model, decoding with the LM's KV cache.

Three ways to build the visual prefix the caption is decoded after:
  - "coarse": `[coarse mode token, v_1..v_T]` with the static query for every frame.
  - "fine" (as in training): a coarse pass, then `fine_iterations` fine passes, each deriving
    frame t's query from the previous pass's hidden state at frame t-1; the caption follows the
    last fine prefix `[fine mode token, v_1..v_T]`. Passes other than the last need no caption:
    the LM is causal, so the visual positions never see it.
  - "autoregressive": one pass, frame by frame: frame t's query comes from the hidden state of
    the *same* pass at frame t-1 (q_init for frame 1), so each visual token joins the KV cache
    as soon as it is computed.
The caption is then decoded one token at a time from the cache; the LM head only ever runs on
the last position.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from transformers import DynamicCache

from .model import COARSE, FINE, FoveatedVLM, FrameFeatures

MODES = ("coarse", "fine", "autoregressive")


@dataclass
class VisualPrefix:
    """The LM state after the visual prefix, ready for decoding.

    cache: the KV cache of the caption pass over `[mode token, v_1..v_T]`.
    last_hidden [B, H]: hidden state at v_T (it predicts the first caption token).
    queries [B, T, D], visual [B, T, H]: the caption pass's queries and visual tokens.
    attention [P, B, T, N]: query attention of every pass run (P = 1 + fine_iterations for
    "fine", 1 otherwise), in the layout of `FoveatedVLM.forward`'s `attention`.
    """

    cache: DynamicCache
    last_hidden: Tensor
    queries: Tensor
    visual: Tensor
    attention: Tensor


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside, each submodule's own previous mode restored after (they may differ)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _lm_step(model: FoveatedVLM, embeds: Tensor, cache: DynamicCache) -> Tensor:
    """Append `embeds` [B, L, H] to the cache; return their last-layer hidden states [B, L, H]."""
    decoder = model.lm.get_decoder()
    # transformers 5.x renamed `past_key_values` to `cache` (the old name warns, then goes away).
    name = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    out = decoder(inputs_embeds=embeds, use_cache=True, **{name: cache})
    return out.last_hidden_state


def _new_cache(model: FoveatedVLM) -> DynamicCache:
    try:
        return DynamicCache(config=model.lm.config)
    except TypeError:  # transformers < 4.56 builds its layers lazily, without a config
        return DynamicCache()


def _embed_dtype(model: FoveatedVLM) -> torch.dtype:
    return model.lm.get_input_embeddings().weight.dtype


def _mode_token(model: FoveatedVLM, mode: int, batch: int) -> Tensor:
    return model.mode_embed[mode].to(_embed_dtype(model)).expand(batch, 1, -1)


def _prefix_parallel(model: FoveatedVLM, inputs: FrameFeatures, fine: bool) -> VisualPrefix:
    """Modes "coarse" and "fine": every frame of a pass at once; only the caption pass fills a cache."""
    batch, frames = inputs.dino.shape[:2]
    queries = model.static_queries(batch, frames)
    attention = []
    if fine:
        empty = inputs.dino.new_zeros(batch, 0, model.mode_embed.shape[1], dtype=_embed_dtype(model))
        # The coarse pass and all fine passes but the last only supply the next queries.
        for p in range(model.config.fine_iterations):
            hidden, attn = model.run_pass(inputs, queries, COARSE if p == 0 else FINE, empty)
            attention.append(attn)
            queries = model.fine_queries(hidden, frames)
    z, attn = model.encode_frames(inputs, queries)
    attention.append(attn)
    visual = model.project_visual(z).to(_embed_dtype(model))
    # The same sequence as `FoveatedVLM.run_pass` builds, but through a cache.
    seq = torch.cat([_mode_token(model, FINE if fine else COARSE, batch), visual], dim=1)
    cache = _new_cache(model)
    hidden = _lm_step(model, seq, cache)
    return VisualPrefix(cache, hidden[:, -1], queries, visual, torch.stack(attention))


def _prefix_autoregressive(model: FoveatedVLM, inputs: FrameFeatures) -> VisualPrefix:
    """Mode "autoregressive": frame t's query from this pass's hidden state at frame t-1."""
    batch, frames = inputs.dino.shape[:2]
    cache = _new_cache(model)
    hidden = [_lm_step(model, _mode_token(model, FINE, batch), cache)]  # position 0: mode token
    queries, visual, attention = [], [], []
    for t in range(frames):
        # `fine_queries` is the model's one definition of "query from the previous position";
        # on the t+1 positions seen so far its last row is frame t's query (q_init for t = 0).
        q = model.fine_queries(torch.cat(hidden, dim=1), t + 1)[:, t : t + 1]
        z, attn = model.encode_frames(inputs.frames(t, t + 1), q)
        v = model.project_visual(z).to(_embed_dtype(model))
        hidden.append(_lm_step(model, v, cache))
        queries.append(q)
        visual.append(v)
        attention.append(attn)
    return VisualPrefix(
        cache,
        hidden[-1][:, -1],
        torch.cat(queries, dim=1),
        torch.cat(visual, dim=1),
        torch.cat(attention, dim=1).unsqueeze(0),
    )


def build_prefix(model: FoveatedVLM, dino: Tensor | Mapping[str, Any], mode: str = "fine") -> VisualPrefix:
    """Run the visual prefix of `mode` over dino [B, T, N, D], or a batch on the device (the deep query
    also reads its block states; eval mode, no autograd)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    tokens = dino if isinstance(dino, Tensor) else dino["dino"]
    if tokens.ndim != 4:
        raise ValueError(f"dino must be [B, T, N, D], got shape {tuple(tokens.shape)}")
    with _eval_mode(model), torch.inference_mode():
        inputs = model.frame_features(dino)
        if mode == "autoregressive":
            return _prefix_autoregressive(model, inputs)
        return _prefix_parallel(model, inputs, fine=mode == "fine")


def _pick(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """Next token per row of logits [B, V]: argmax at temperature 0, else a (top-k) sample."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _decode(
    model: FoveatedVLM,
    prefix: VisualPrefix,
    eos_id: int,
    max_tokens: int,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None,
) -> list[list[int]]:
    lm_head = model.lm.get_output_embeddings()
    embed = model.lm.get_input_embeddings()
    batch = prefix.last_hidden.shape[0]
    tokens: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    hidden = prefix.last_hidden
    for step in range(max_tokens):
        nxt = _pick(lm_head(hidden), temperature, top_k, generator)
        for i, tok in enumerate(nxt.tolist()):
            if not done[i]:
                if tok == eos_id:
                    done[i] = True
                else:
                    tokens[i].append(tok)
        if all(done) or step == max_tokens - 1:
            break
        # Finished samples keep decoding (their tokens are dropped): the batch stays rectangular.
        hidden = _lm_step(model, embed(nxt).unsqueeze(1), prefix.cache)[:, -1]
    return tokens


def generate_captions(
    model: FoveatedVLM,
    dino: Tensor | Mapping[str, Any],
    eos_id: int,
    max_tokens: int = 64,
    mode: str = "fine",
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Caption token ids per sample of dino [B, T, N, D] (or a batch: `build_prefix`), without the EOS
    that ends them.

    A sample stops at its first EOS while the others continue; `max_tokens` caps every caption.
    temperature 0 decodes greedily; above 0 it samples from softmax(logits / temperature),
    restricted to the `top_k` most likely tokens if given, drawing from `generator`.
    The model runs in eval mode without autograd; its train/eval mode is restored after.
    """
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    with _eval_mode(model), torch.inference_mode():
        prefix = build_prefix(model, dino, mode)
        return _decode(model, prefix, eos_id, max_tokens, temperature, top_k, generator)
