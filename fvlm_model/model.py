"""The foveated video-language model on precomputed DINOv2 tokens and SD-VAE latents.

Each frame is compressed to ONE visual token by a single query attending over its DINO tokens.
A coarse pass uses a learned static query for every frame; each fine pass derives frame t's
query from the previous pass's LM hidden state at frame t-1. Every pass runs the sequence
`[mode_token, v_1..v_T, caption]` through a causal LM and is scored by
  - caption cross-entropy (the first caption token is predicted from the last visual position),
  - next-frame reconstruction: the hidden state before frame t's token predicts the VAE latent
    x_t through a head (`fvlm_model.heads`): by default the seed's FiLM head conditioned on x_{t-1}.

loss = (l_cap * cap_fine + l_rec * rec_fine) + l_coarse * (l_cap * cap_coarse + l_rec * rec_coarse)   (`joint_loss`;
l_cap is 1 unless reconstruction is trained alone, l_cap = 0)
where cap_* are caption-loss sums over tokens divided by the number of caption tokens and rec_* are
per-video mean squared errors summed over videos divided by the number of videos.

Shapes: B batch, T frames, N DINO tokens per frame, D DINO width, H LM width, L caption length,
P = 1 + fine_iterations passes, latents [C, S, S].
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel

from .deep_query import DeepQuery
from .heads import RECON_HEADS, prediction_head

COARSE, FINE = 0, 1  # rows of the mode embedding
IGNORE_INDEX = -100


@dataclass
class ModelConfig:
    """The model's shape and loss weights, and their defaults: `FoveatedVLM(lm, config)`.

    The trainer makes it from its run configuration and the store's feature shapes
    (`fvlm_train.checkpoint.model_config`); a checkpoint stores the run configuration, not this.
    """

    dino_dim: int = 384  # D
    num_tokens: int | None = None  # N; informational, the model accepts any N
    latent_channels: int = 4  # C
    latent_size: int = 32  # S
    fine_iterations: int = 2
    lambda_recon: float = 0.1
    lambda_coarse: float = 1.0
    lambda_caption: float = 1.0  # 0: reconstruction only (the caption losses are still reported)
    recon_head: str = "film"  # one of fvlm_model.heads.RECON_HEADS
    query_depth: int = 0  # 0: one attention over the final tokens; L: through DINO's last L blocks (deep_query.py)
    lm_name: str = ""  # informational: FoveatedVLM sets it to the name of the LM it wraps

    def __post_init__(self) -> None:
        if self.fine_iterations < 1:
            raise ValueError(f"fine_iterations must be >= 1, got {self.fine_iterations}")
        if self.recon_head not in RECON_HEADS:
            raise ValueError(f"recon_head must be one of {', '.join(RECON_HEADS)}, got {self.recon_head!r}")
        if self.query_depth < 0:
            raise ValueError(f"query_depth must be >= 0, got {self.query_depth}")


@dataclass
class FrameFeatures:
    """What the queries attend to, prepared once per batch (`FoveatedVLM.frame_features`) and shared by every
    pass: the final DINO tokens [B, T, N, D], them in the compute dtype, and for the deep query each block's
    keys and values of the stored patch states ([B, T, heads, N, D / heads] each)."""

    dino: Tensor
    features: Tensor
    keys_values: list[tuple[Tensor, Tensor]] | None = None

    def frames(self, start: int, stop: int) -> FrameFeatures:
        """Frames start..stop-1 (generation runs frame by frame)."""
        kv = None if self.keys_values is None else [(k[:, start:stop], v[:, start:stop]) for k, v in self.keys_values]
        return FrameFeatures(self.dino[:, start:stop], self.features[:, start:stop], kv)


def joint_loss(config: ModelConfig, cap_coarse: Any, cap_fine: Any, rec_coarse: Any, rec_fine: Any) -> Any:
    """The training objective from the passes' losses (tensors or floats): the one place it is written."""
    lcap, lr, lc = config.lambda_caption, config.lambda_recon, config.lambda_coarse
    return (lcap * cap_fine + lr * rec_fine) + lc * (lcap * cap_coarse + lr * rec_coarse)


class FoveatedVLM(nn.Module):
    def __init__(self, lm: PreTrainedModel, config: ModelConfig, deep_query: DeepQuery | None = None) -> None:
        """`deep_query`: DINO's last `config.query_depth` blocks (`DeepQuery.from_dino`), needed exactly when
        the depth is above 0."""
        super().__init__()
        if (deep_query is None) != (config.query_depth == 0) or (
                deep_query is not None and len(deep_query.blocks) != config.query_depth):
            raise ValueError(f"query_depth {config.query_depth} needs DINO's last {config.query_depth} blocks, given "
                             f"{0 if deep_query is None else len(deep_query.blocks)}")
        # A copy: changing one model's config changes no other model built from the same one.
        self.config = replace(config, lm_name=lm.config.name_or_path or "unknown")
        dino_dim, latent_channels, latent_size = config.dino_dim, config.latent_channels, config.latent_size
        self.lm = lm
        embed = lm.get_input_embeddings().weight
        hidden = embed.shape[1]

        # Queries with std 1.0: with std 0.02 all queries give the same (uniform) attention.
        self.q_static = nn.Parameter(torch.randn(dino_dim))
        self.q_init = nn.Parameter(torch.randn(dino_dim))
        # No bias: a bias would dominate the query and make all attention patterns alike.
        self.w_q = nn.Linear(dino_dim, dino_dim, bias=False)
        self.llm_to_query = nn.Linear(hidden, dino_dim)

        # Visual tokens are put on the scale of the LM's own token embeddings, per token.
        self.proj = nn.Linear(dino_dim, hidden)
        embed_rms = embed.detach().float().pow(2).mean().sqrt()
        self.register_buffer("visual_scale", embed_rms)
        self.mode_embed = nn.Parameter(torch.randn(2, hidden) * embed_rms)

        self.latent_init = nn.Parameter(torch.zeros(latent_channels, latent_size, latent_size))
        self.head = prediction_head(config.recon_head, hidden, latent_channels, latent_size)
        # Built outside and passed in: at depth 0 the model's parameters and random draws are those of before.
        self.deep_query = deep_query

    # ---- building blocks (public: generation reuses them) -------------------------------------

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype matmuls run in: the autocast dtype if autocast is on, else the weights'."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.w_q.weight.dtype

    def static_queries(self, batch: int, frames: int) -> Tensor:
        """The coarse pass's query for every frame: [B, T, D]."""
        return self.q_static.expand(batch, frames, -1)

    def fine_queries(self, hidden: Tensor, frames: int) -> Tensor:
        """Queries from the previous pass: frame t's from the hidden state at frame t-1's token
        (position t-1 + 1 after the mode token), q_init for the first frame. -> [B, T, D]."""
        rest = self.llm_to_query(hidden[:, 1:frames])
        first = self.q_init.to(rest.dtype).expand(hidden.shape[0], 1, -1)
        return torch.cat([first, rest], dim=1)

    def frame_features(self, batch: Mapping[str, Any] | Tensor) -> FrameFeatures:
        """The batch's features as every pass reads them (converted once): `dino` (a batch or the tensor
        itself) and, for the deep query, the keys and values of its blocks' stored states (`dino_block<k>`)."""
        dino = batch if isinstance(batch, Tensor) else batch["dino"]
        features = dino.to(self.compute_dtype(dino.device))
        if self.deep_query is None:
            return FrameFeatures(dino, features)
        names = self.deep_query.array_names
        if isinstance(batch, Tensor) or any(n not in batch for n in names):
            raise ValueError(f"query_depth {self.config.query_depth} needs the batch's {', '.join(names)} "
                             "(a store made with precompute --dino-layers)")
        dtype = features.dtype
        return FrameFeatures(dino, features, self.deep_query.keys_values([batch[n].to(dtype) for n in names]))

    def encode_frames(self, dino: Tensor | FrameFeatures, queries: Tensor, features: Tensor | None = None,
                      per_block: bool = False) -> tuple[Tensor, Tensor]:
        """One token per frame, all frames at once: dino [B, T, N, D] (or `frame_features`), queries
        [B, T, D] -> (z [B, T, D], attention [B, T, N]).

        Depth 0: z_t = softmax(W_q q_t . P_t^T / sqrt(D)) P_t. The scores and the softmax are computed in
        fp32 (bf16 scores would shift a sharp attention by percents); the weighted sum runs in the compute
        dtype on `features` (dino converted to it; pass it when calling once per pass, so the conversion
        happens once). Deep query: W_q q_t passes DINO's last blocks (`deep_query.py`); the attention is its
        last block's, averaged over heads, or with `per_block` every block's [B, T, L, N] (depth 0: L = 1).
        """
        if isinstance(dino, FrameFeatures):
            dino, features, keys_values = dino.dino, dino.features, dino.keys_values
        elif self.deep_query is not None:  # a tensor alone has no block states
            raise ValueError(f"query_depth {self.config.query_depth} needs the batch's block states: pass "
                             "frame_features(batch)")
        if features is None:
            features = dino.to(self.compute_dtype(dino.device))
        if self.deep_query is not None:
            z, maps = self.deep_query(self.w_q(queries.to(features.dtype)), keys_values)
            return z, maps if per_block else maps[..., -1, :]
        with torch.autocast(dino.device.type, enabled=False):
            q = F.linear(queries.float(), self.w_q.weight.float())
            scores = (dino.float() @ q.unsqueeze(-1)).squeeze(-1) * dino.shape[-1] ** -0.5
            attn = scores.softmax(dim=-1)
        z = (attn.to(features.dtype).unsqueeze(-2) @ features).squeeze(-2)
        return z, attn.unsqueeze(-2) if per_block else attn

    def project_visual(self, z: Tensor) -> Tensor:
        """[B, T, D] -> [B, T, H]: linear map, then RMS-normalise each token to the LM's embedding
        scale (a per-token op, so a sample never depends on the rest of the batch)."""
        v = self.proj(z)
        return F.rms_norm(v, (v.shape[-1],), eps=1e-6) * self.visual_scale.to(v.dtype)

    def run_pass(
        self, dino: Tensor | FrameFeatures, queries: Tensor, mode: int, caption_embeds: Tensor,
        features: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One pass of the LM over `[mode_token, v_1..v_T, caption_embeds]`.

        caption_embeds [B, L', H] may have L' = 0. Returns the last layer's hidden state (after
        the final norm) [B, 1 + T + L', H] and the query attention [B, T, N].
        """
        z, attn = self.encode_frames(dino, queries, features)
        dtype = caption_embeds.dtype
        mode_token = self.mode_embed[mode].to(dtype).expand(queries.shape[0], 1, -1)
        seq = torch.cat([mode_token, self.project_visual(z).to(dtype), caption_embeds], dim=1)
        # Right padding + causal attention: no mask needed, padding never affects real positions.
        out = self.lm.get_decoder()(inputs_embeds=seq, use_cache=False)
        return out.last_hidden_state, attn

    def caption_token_loss(self, caption_hidden: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy per caption token [B, L] (0 where labels are -100). caption_hidden
        [B, L, H] are the positions T .. T+L-1; the LM head runs on these only."""
        logits = self.lm.get_output_embeddings()(caption_hidden)
        ce = F.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        )
        return ce.view_as(labels)

    def predict_latents(self, rec_hidden: Tensor, latents: Tensor) -> Tensor:
        """Next-frame predictions [..., B, T, C, S, S] from rec_hidden [..., B, T, H], the hidden
        states at the positions before each frame's token, and the true latents [B, T, C, S, S]
        (only x_0 .. x_{T-2} are used, as the previous frames)."""
        init = self.latent_init.to(latents.dtype).expand(latents.shape[0], 1, *latents.shape[2:])
        prev = torch.cat([init, latents[:, :-1]], dim=1)
        return self.head(rec_hidden, prev)

    def every_parameter_gets_a_gradient(self) -> bool:
        """False when these options leave parameters without a gradient (DDP must be told so): the head at
        lambda_recon 0 (it runs without a graph, below) and latent_init with the `hidden` head (which never
        reads the previous latents)."""
        return self.config.lambda_recon != 0.0 and self.config.recon_head != "hidden"

    # ---- training forward ---------------------------------------------------------------------

    def forward(
        self, batch: Mapping[str, Any], *,
        cap_tokens: Tensor | None = None, num_videos: Tensor | None = None, score_all_passes: bool = False,
    ) -> dict[str, Tensor]:
        """`batch` is the dataset's batch on the device, keyed by the store's array names; the model reads
        `dino` [B, T, N, D] (any float dtype; fp16 as stored is best), `latents` [B, T, C, S, S], and
        `input_ids` and `labels` [B, L] (labels -100 on padding, EOS included as a real label). Other
        entries (timestamps, captions, ids) are ignored.

        The caption losses are divided by `cap_tokens` and the reconstruction losses by
        `num_videos` (default: this batch's caption tokens and videos). A step over several
        micro-batches passes the totals of the whole step, so its summed gradient is the gradient
        of one batch of all of them.

        Returns `loss` (with grad) and detached metrics: cap_coarse, cap_fine, rec_coarse,
        rec_fine (fine = last pass; normalised as the loss is), cap_passes / rec_passes [P],
        cap_sum [P, B] (caption loss summed over each video's tokens), cap_tokens [B],
        cap_per_sample = cap_sum / cap_tokens and rec_per_sample [P, B], attention [P, B, T, N],
        pred_latents [P, B, T, C, S, S], last_queries [B, T, D] (the last pass's queries, for
        `shuffled_query_loss`), queries [P, B, T, D] (every pass's: `encode_frames` remakes its tokens and,
        for the deep query, its per-block attention). The intermediate fine passes only make the next queries, so they
        run without the caption (their visual hidden states do not depend on it: causal) and
        their caption losses are NaN unless `score_all_passes` (evaluation) asks for them.
        """
        dino, input_ids, labels = batch["dino"], batch["input_ids"], batch["labels"]
        latents = batch["latents"].to(self.latent_init.dtype)
        videos, frames = dino.shape[:2]
        num_passes = 1 + self.config.fine_iterations
        # Convert the features (and make the deep query's keys and values) once, not once per pass.
        inputs = self.frame_features(batch)
        # The last caption token predicts nothing, so it is never fed.
        caption_embeds = self.lm.get_input_embeddings()(input_ids[:, :-1])
        no_caption = caption_embeds[:, :0]

        token_ce, rec_hidden, attention, pass_queries = [], [], [], []
        queries = self.static_queries(videos, frames)
        for p in range(num_passes):
            scored = p in (0, num_passes - 1) or score_all_passes
            pass_queries.append(queries)
            hidden, attn = self.run_pass(inputs, queries, COARSE if p == 0 else FINE,
                                         caption_embeds if scored else no_caption)
            if p in (0, num_passes - 1):
                token_ce.append(self.caption_token_loss(hidden[:, frames:], labels))
            elif scored:  # reported only: no graph
                with torch.no_grad():
                    token_ce.append(self.caption_token_loss(hidden[:, frames:].detach(), labels))
            else:
                token_ce.append(torch.full(labels.shape, float("nan"), device=labels.device))
            rec_hidden.append(hidden[:, :frames])  # position t-1 precedes frame t's token
            attention.append(attn)
            if p < num_passes - 1:
                queries = self.fine_queries(hidden, frames)

        tokens = (labels != IGNORE_INDEX).sum(dim=1)  # [B]
        cap_sum = torch.stack(token_ce).float().sum(dim=2)  # [P, B]
        cap_norm = tokens.sum().clamp(min=1) if cap_tokens is None else cap_tokens
        cap_passes = cap_sum.sum(dim=1) / cap_norm

        # One head call for all passes (the FiLM head encodes the previous latents once).
        if self.config.lambda_recon == 0.0:
            # Caption-only training: reconstruction is only reported, so score it without a graph
            # (its gradient would be zero; the head's backward is most of a small model's step).
            with torch.no_grad():
                pred = self.predict_latents(torch.stack(rec_hidden).detach(), latents)
        else:
            pred = self.predict_latents(torch.stack(rec_hidden), latents)  # [P, B, T, C, S, S]
        rec_per_sample = (pred.float() - latents).pow(2).mean(dim=(2, 3, 4, 5))
        rec_passes = rec_per_sample.sum(dim=1) / (videos if num_videos is None else num_videos)

        loss = joint_loss(self.config, cap_passes[0], cap_passes[-1], rec_passes[0], rec_passes[-1])
        return {
            "loss": loss,
            "cap_coarse": cap_passes[0].detach(),
            "cap_fine": cap_passes[-1].detach(),
            "rec_coarse": rec_passes[0].detach(),
            "rec_fine": rec_passes[-1].detach(),
            "cap_passes": cap_passes.detach(),
            "rec_passes": rec_passes.detach(),
            "cap_sum": cap_sum.detach(),
            "cap_tokens": tokens,
            "cap_per_sample": (cap_sum / tokens.clamp(min=1)).detach(),
            "rec_per_sample": rec_per_sample.detach(),
            "attention": torch.stack(attention).detach(),
            "pred_latents": pred.detach(),
            "last_queries": queries.detach(),
            "queries": torch.stack([q.expand(videos, frames, -1) for q in pass_queries]).detach(),
        }

    # ---- evaluation control -------------------------------------------------------------------

    @torch.no_grad()
    def shuffled_query_loss(self, batch: Mapping[str, Any], last_queries: Tensor) -> Tensor:
        """Per-video caption loss, summed over the caption's tokens [B] (as `cap_sum`), of the last
        pass when its queries for frames 2..T come from ANOTHER video (the batch rolled by one;
        frame 1 keeps q_init). `last_queries` [B, T, D] are `forward`'s output of that name for
        the same `batch`, so no earlier pass runs again.

        The control for "the fine pass uses this video's earlier frames": if cap_fine is lower than
        this, the gain comes from where the queries look, not from the fine pass having its own
        parameters (q_init, the mode token). Needs B >= 2 (with B = 1 the roll is the identity).
        """
        input_ids, labels = batch["input_ids"], batch["labels"]
        frames = batch["dino"].shape[1]
        caption_embeds = self.lm.get_input_embeddings()(input_ids[:, :-1])
        queries = torch.cat([last_queries[:, :1], last_queries[:, 1:].roll(1, dims=0)], dim=1)
        hidden, _ = self.run_pass(self.frame_features(batch), queries, FINE, caption_embeds)
        return self.caption_token_loss(hidden[:, frames:], labels).float().sum(dim=1)
