"""The deep query: the frame's query passes DINO's last blocks, over the patch states the store holds.

At each of DINO's last L blocks the query token q is updated with the block's own frozen weights,
    q += ls1 * out_proj(softmax(Q(norm1(q)) K^T / sqrt(d)) V)      (per head)
    q += ls2 * mlp(norm2(q))
where K, V are the block's key and value projections of norm1 of the *patch* states entering that block
(precompute --dino-layers stores them as `dino_block<k>`); after the last block, DINO's final layer norm
gives the frame's token. The patches never attend to the query, and the query attends to the patches only,
so the patch states do not depend on it and were computed once, in precompute (`../shared/DESIGN.md`,
"Deep query"). This equals running the query as one more token through DINO's own blocks with an
attention mask that hides its key from every token (tests/test_deep_query.py).

The weights are buffers that no checkpoint saves: they are the store's DINO, loaded by id and checked
against the store's fingerprint when the model is built (`fvlm_train.checkpoint.build_model`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fvlm_data.store.format import block_array


def _layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight.to(x.dtype), bias.to(x.dtype), eps)


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


class FrozenBlock(nn.Module):
    """One DINO block's weights (buffers, not parameters: never trained, never saved) and the two halves
    the deep query needs: the patches' keys and values, and the query's update."""

    def __init__(self, weights: dict[str, Tensor], heads: int, eps: float, mlp: str) -> None:
        super().__init__()
        if mlp not in ("gelu", "swiglu"):
            raise ValueError(f"the deep query runs DINO blocks with a GELU or SwiGLU MLP, not {mlp!r}")
        self.heads, self.eps, self.mlp = heads, eps, mlp
        for name, t in weights.items():
            self.register_buffer(name, t.detach().clone().float(), persistent=False)

    @classmethod
    def from_dino(cls, block: nn.Module, kind: str) -> FrozenBlock:
        """The weights of a transformers `Dinov2Layer` or a timm ViT `Block`."""
        w: dict[str, Tensor] = {}
        if kind == "timm":
            attn, mlp = block.attn, block.mlp
            dim = attn.qkv.in_features
            qkv_w, qkv_b = attn.qkv.weight, attn.qkv.bias
            for i, part in enumerate("qkv"):
                w[f"{part}_weight"] = qkv_w[i * dim:(i + 1) * dim]
                w[f"{part}_bias"] = qkv_b[i * dim:(i + 1) * dim] if qkv_b is not None else torch.zeros(dim)
            w["o_weight"], w["o_bias"] = attn.proj.weight, attn.proj.bias
            ones = torch.ones(dim)
            w["ls1"] = getattr(block.ls1, "gamma", ones)
            w["ls2"] = getattr(block.ls2, "gamma", ones)
            heads, kind_mlp = attn.num_heads, "gelu"
            w["fc1_weight"], w["fc1_bias"], w["fc2_weight"], w["fc2_bias"] = (
                mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
        else:
            attn = block.attention
            for part in "qkvo":
                proj = getattr(attn, f"{part}_proj")
                w[f"{part}_weight"] = proj.weight
                w[f"{part}_bias"] = proj.bias if proj.bias is not None else torch.zeros(proj.out_features)
            w["ls1"], w["ls2"] = block.layer_scale1.lambda1, block.layer_scale2.lambda1
            heads = attn.num_attention_heads
            if hasattr(block.mlp, "gate_proj"):
                kind_mlp = "swiglu"
                for part in ("gate", "up", "down"):
                    proj = getattr(block.mlp, f"{part}_proj")
                    w[f"{part}_weight"], w[f"{part}_bias"] = proj.weight, proj.bias
            else:
                kind_mlp = "gelu"
                w["fc1_weight"], w["fc1_bias"], w["fc2_weight"], w["fc2_bias"] = (
                    block.mlp.fc1.weight, block.mlp.fc1.bias, block.mlp.fc2.weight, block.mlp.fc2.bias)
        for norm in ("norm1", "norm2"):
            module = getattr(block, norm)
            w[f"{norm}_weight"], w[f"{norm}_bias"] = module.weight, module.bias
        return cls(w, heads, float(block.norm1.eps), kind_mlp)

    def keys_values(self, states: Tensor) -> tuple[Tensor, Tensor]:
        """Patch states [..., N, D] entering the block -> keys and values [..., heads, N, D / heads]."""
        x = _layer_norm(states, self.norm1_weight, self.norm1_bias, self.eps)
        split = (*x.shape[:-1], self.heads, -1)
        k = _linear(x, self.k_weight, self.k_bias).view(split).transpose(-2, -3)
        v = _linear(x, self.v_weight, self.v_bias).view(split).transpose(-2, -3)
        return k, v

    def forward(self, q: Tensor, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """The query [..., D] after this block, and its attention over the N patches [..., heads, N]. The
        scores and softmax in fp32, as the shallow query's."""
        x = _layer_norm(q, self.norm1_weight, self.norm1_bias, self.eps)
        qh = _linear(x, self.q_weight, self.q_bias).view(*q.shape[:-1], self.heads, 1, -1)
        with torch.autocast(q.device.type, enabled=False):
            scores = (qh.float() @ keys.float().transpose(-1, -2)) * qh.shape[-1] ** -0.5  # [..., heads, 1, N]
            attn = scores.softmax(dim=-1)
        out = (attn.to(values.dtype) @ values).reshape(*q.shape[:-1], -1)
        q = q + self.ls1.to(q.dtype) * _linear(out.to(q.dtype), self.o_weight, self.o_bias)
        x = _layer_norm(q, self.norm2_weight, self.norm2_bias, self.eps)
        if self.mlp == "swiglu":
            h = F.silu(_linear(x, self.gate_weight, self.gate_bias)) * _linear(x, self.up_weight, self.up_bias)
            h = _linear(h, self.down_weight, self.down_bias)
        else:
            h = _linear(F.gelu(_linear(x, self.fc1_weight, self.fc1_bias)), self.fc2_weight, self.fc2_bias)
        return q + self.ls2.to(q.dtype) * h, attn.squeeze(-2)


class DeepQuery(nn.Module):
    """The query through DINO's blocks `blocks` (0-based indices in DINO), then its final norm."""

    def __init__(self, blocks: Sequence[FrozenBlock], block_ids: Sequence[int], final_norm: nn.LayerNorm) -> None:
        super().__init__()
        if len(blocks) != len(block_ids) or not blocks:
            raise ValueError("the deep query needs at least one block, and one index per block")
        self.blocks = nn.ModuleList(blocks)
        self.block_ids = tuple(int(k) for k in block_ids)
        self.register_buffer("norm_weight", final_norm.weight.detach().clone().float(), persistent=False)
        self.register_buffer("norm_bias", final_norm.bias.detach().clone().float(), persistent=False)
        self.norm_eps = float(final_norm.eps)

    @classmethod
    def from_dino(cls, dino: nn.Module, kind: str, depth: int) -> DeepQuery:
        """The last `depth` blocks of a transformers `Dinov2Model` (kind 'transformers') or a timm ViT."""
        layers = dino.blocks if kind == "timm" else dino.encoder.layer
        if not 1 <= depth <= len(layers):
            raise ValueError(f"query depth {depth}: this DINO has {len(layers)} blocks")
        ids = list(range(len(layers) - depth, len(layers)))
        norm = dino.norm if kind == "timm" else dino.layernorm
        return cls([FrozenBlock.from_dino(layers[k], kind) for k in ids], ids, norm)

    @property
    def array_names(self) -> tuple[str, ...]:
        """The batch entries it reads: the states entering its blocks (`dino_block<k>`, as the store names them)."""
        return tuple(block_array(k) for k in self.block_ids)

    @torch.no_grad()
    def keys_values(self, states: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Per block, the keys and values of the stored states [B, T, N, D]: no gradient (frozen weights on
        stored data), computed once per batch and shared by every pass."""
        return [block.keys_values(s) for block, s in zip(self.blocks, states, strict=True)]

    def forward(self, queries: Tensor, keys_values: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """queries [B, T, D] (in DINO's width) -> (frame tokens [B, T, D] after the final norm, attention of
        every block averaged over its heads [B, T, L, N])."""
        q, maps = queries, []
        for block, (k, v) in zip(self.blocks, keys_values, strict=True):
            q, attn = block(q, k, v)
            maps.append(attn.mean(dim=-2))
        z = F.layer_norm(q, (q.shape[-1],), self.norm_weight.to(q.dtype), self.norm_bias.to(q.dtype), self.norm_eps)
        return z, torch.stack(maps, dim=-2)
