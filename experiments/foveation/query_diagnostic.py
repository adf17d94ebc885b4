"""The reference's diagnostic of the query mechanism, before any training: do two different queries give
different frame tokens? For the shallow query (one attention over DINO's final tokens) and the deep query
(through DINO's last L blocks over the stored states, then its final norm).

    python -m experiments.foveation.query_diagnostic --store S [--videos 64] [--depth L] [--pairs 16]

For `--videos` videos of a store made with `precompute --dino-layers`, every frame, and `--pairs` pairs of queries,
it prints per mode: the Pearson correlation between the two queries' frame tokens (over the D channels, averaged
over frames and pairs; the reference measured 0.98 shallow and 0.43 deep on DINOv2-small), the correlation between
one query's tokens of two different videos (the control: near 1, the token says little about its video, whatever
the first number), and the attention entropy in nats over the N tokens (log N is uniform; the deep query's is its
last block's, averaged over heads). Two kinds of queries: N(0, 1) per channel (the model's q_static and q_init
start so), and tokens of other videos' frames entering the first deep block (queries of DINO's own distribution).
The shallow query uses no learned projection here (the model's W_q is learned), the deep one DINO's own
projections: the numbers describe the mechanisms, not a trained model.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from fvlm_data import FeatureDataset, FeatureStore
from fvlm_data.dataset import to_device
from fvlm_data.precompute.encoders import load_dino
from fvlm_model.deep_query import DeepQuery


def shallow(tokens: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One attention of q [B, T, D] over the final tokens [B, T, N, D]: (z, attention)."""
    attn = ((tokens @ q.unsqueeze(-1)).squeeze(-1) * tokens.shape[-1] ** -0.5).softmax(-1)
    return (attn.unsqueeze(-2) @ tokens).squeeze(-2), attn


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over frames of the Pearson correlation of a and b over the last axis."""
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return float(((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean())


def entropy(attn: torch.Tensor) -> float:
    return float(-(attn * attn.clamp_min(1e-12).log()).sum(-1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--videos", type=int, default=64)
    parser.add_argument("--depth", type=int, default=None, help="deep query blocks [default: all the store has]")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    store = FeatureStore.open(args.store)
    ds = FeatureDataset.from_store(store, int(store.attrs["num_frames"]), store.committed_slots())
    blocks = store.dino_blocks
    depth = args.depth or len(blocks)
    if not blocks or depth > len(blocks):
        raise SystemExit(f"error: {args.store} holds the states of {len(blocks)} DINO blocks; need {depth} "
                         "(precompute --dino-layers)")
    ds.read_block_states(blocks[len(blocks) - depth:])
    items = ds.__getitems__(list(range(min(args.videos, len(ds)))))
    batch = to_device({k: torch.stack([it[k] for it in items]) for k in items[0] if torch.is_tensor(items[0][k])},
                      torch.device("cpu"), torch.float32)
    dino, kind = load_dino(ds.attrs["dino"])
    deep = DeepQuery.from_dino(dino, kind, depth)
    kv = deep.keys_values([batch[n] for n in deep.array_names])
    tokens = batch["dino"]
    g = torch.Generator().manual_seed(args.seed)
    first = batch[deep.array_names[0]]  # [B, T, N, D]: the states entering the first deep block
    print(f"{args.store}: {len(items)} videos x {tokens.shape[1]} frames, N = {tokens.shape[2]} tokens "
          f"(uniform attention: {math.log(tokens.shape[2]):.2f} nats), deep query through blocks {deep.block_ids}")
    print(f"{'queries':<24} {'mode':<8} {'corr(z1, z2)':>13} {'corr(video, other video)':>25} {'entropy':>8}")
    for name in ("N(0,1)", "other videos' tokens"):
        stats: dict[str, list[tuple[float, float]]] = {"shallow": [], "deep": []}
        for _ in range(args.pairs):
            if name == "N(0,1)":
                q1, q2 = (torch.randn(tokens.shape[0], tokens.shape[1], tokens.shape[-1], generator=g) for _ in "12")
            else:  # a random token of another (rolled) video's same frame, two draws
                picks = torch.randint(0, first.shape[2], (2,), generator=g).tolist()
                q1, q2 = (first.roll(1 + p % (first.shape[0] - 1), dims=0)[:, :, p] for p in picks)
            with torch.no_grad():
                (z1, a1), (z2, a2) = shallow(tokens, q1), shallow(tokens, q2)
                # The same queries over another video's frames (the batch rolled by one): a token that
                # ignores its video correlates ~1 with it.
                other = shallow(tokens.roll(1, dims=0), q1)[0]
                stats["shallow"].append((correlation(z1, z2), correlation(z1, other), (entropy(a1) + entropy(a2)) / 2))
                (d1, m1), (d2, m2) = deep(q1, kv), deep(q2, kv)
                other = deep(q1, [(k.roll(1, dims=0), v.roll(1, dims=0)) for k, v in kv])[0]
                stats["deep"].append((correlation(d1, d2), correlation(d1, other),
                                      (entropy(m1[..., -1, :]) + entropy(m2[..., -1, :])) / 2))
        for mode, values in stats.items():
            corr, same_query, ent = np.mean(values, axis=0)
            print(f"{name:<24} {mode:<8} {corr:>13.3f} {same_query:>25.3f} {ent:>8.2f}")


if __name__ == "__main__":
    main()
