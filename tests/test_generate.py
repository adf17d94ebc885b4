"""Caption generation on the tiny preset (a real random-initialised Llama; no mocks): the cached
decoding against naive full re-runs, stopping at EOS, batching, sampling, autoregressive queries."""

import pytest
import torch

from fvlm_model import FoveatedVLM, ModelConfig, load_lm
from fvlm_model.generate import MODES, build_prefix, generate_captions
from fvlm_model.model import COARSE, FINE

B, T, N, D = 3, 4, 17, 32
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def eos_id() -> int:
    return load_lm("tiny")[1].eos_token_id


@pytest.fixture(scope="module")
def model() -> FoveatedVLM:
    lm, _ = load_lm("tiny")
    torch.manual_seed(0)
    return FoveatedVLM(lm, ModelConfig(dino_dim=D, latent_channels=4, latent_size=8, fine_iterations=2)).eval()


@pytest.fixture(scope="module")
def dino() -> torch.Tensor:
    return torch.randn(B, T, N, D, generator=torch.Generator().manual_seed(1))


def cut_at_eos(seqs: torch.Tensor, eos_id: int) -> list[list[int]]:
    out = []
    for row in seqs.tolist():
        out.append(row[: row.index(eos_id)] if eos_id in row else row)
    return out


@torch.no_grad()
def naive_greedy(model: FoveatedVLM, dino: torch.Tensor, mode: str, max_tokens: int, queries=None) -> torch.Tensor:
    """Greedy decoding that re-runs every pass over the whole sequence at every step, exactly as
    the training forward does (no cache). `queries` fixes the caption pass's queries instead
    (autoregressive mode). -> [B, max_tokens], EOS not special."""
    batch = dino.shape[0]
    embed, lm_head = model.lm.get_input_embeddings(), model.lm.get_output_embeddings()
    ids = torch.zeros(batch, 0, dtype=torch.long)
    passes = {"coarse": 1, "fine": 1 + model.config.fine_iterations, "autoregressive": 1}[mode]
    for _ in range(max_tokens):
        q = model.static_queries(batch, T) if queries is None else queries
        for p in range(passes):
            pass_mode = COARSE if mode == "coarse" else (COARSE if p == 0 and queries is None else FINE)
            hidden, _ = model.run_pass(dino, q, pass_mode, embed(ids))
            if p < passes - 1:
                q = model.fine_queries(hidden, T)
        ids = torch.cat([ids, lm_head(hidden[:, -1]).argmax(-1, keepdim=True)], dim=1)
    return ids


class EosForcer:
    """Forward hook on the LM head: EOS never wins, except for sample i at its `stop_at[i]`-th call
    (the call that picks caption token k), where it always wins."""

    def __init__(self, eos_id: int, stop_at: dict[int, int]):
        self.eos_id, self.stop_at, self.calls = eos_id, stop_at, 0

    def __call__(self, module, inputs, logits):
        logits = logits.clone()
        logits[:, self.eos_id] = float("-inf")
        for i, k in self.stop_at.items():
            if self.calls == k:
                logits[i, self.eos_id] = float("inf")
        self.calls += 1
        return logits


def generate_forced(model, dino, eos_id, stop_at, **kwargs):
    forcer = EosForcer(eos_id, stop_at)
    handle = model.lm.get_output_embeddings().register_forward_hook(forcer)
    try:
        return generate_captions(model, dino, eos_id, **kwargs), forcer.calls
    finally:
        handle.remove()


@pytest.mark.parametrize("mode", ["coarse", "fine"])
def test_cached_greedy_matches_naive_rerun(model, dino, eos_id, mode):
    naive = naive_greedy(model, dino, mode, MAX_TOKENS)
    got = generate_captions(model, dino, eos_id, max_tokens=MAX_TOKENS, mode=mode)
    assert got == cut_at_eos(naive, eos_id)
    # With an EOS that never occurs (-1) the full-length captions agree too.
    assert generate_captions(model, dino, -1, max_tokens=MAX_TOKENS, mode=mode) == naive.tolist()


def test_modes_differ(model, dino):
    prefixes = {m: build_prefix(model, dino, m) for m in MODES}
    assert prefixes["fine"].attention.shape == (1 + model.config.fine_iterations, B, T, N)
    assert prefixes["coarse"].attention.shape == prefixes["autoregressive"].attention.shape == (1, B, T, N)
    for a in MODES:
        assert prefixes[a].queries.shape == (B, T, D) and prefixes[a].last_hidden.shape == (B, 128)
        for b in MODES:
            if a < b:
                assert not torch.allclose(prefixes[a].visual, prefixes[b].visual)
    # Every mode's coarse pass (the first of "fine") is the plain static-query pass.
    torch.testing.assert_close(prefixes["fine"].attention[0], prefixes["coarse"].attention[0])


def test_autoregressive_queries_are_the_fine_query_rule_of_one_pass(model, dino, eos_id):
    prefix = build_prefix(model, dino, "autoregressive")
    with torch.no_grad():
        # A full, non-cached forward of the same prefix [fine mode token, v_1..v_T] ...
        seq = torch.cat([model.mode_embed[FINE].expand(B, 1, -1), prefix.visual], dim=1)
        hidden = model.lm.get_decoder()(inputs_embeds=seq, use_cache=False).last_hidden_state
        # ... gives back every frame's query: q_t = llm_to_query(hidden at frame t-1), q_1 = q_init.
        torch.testing.assert_close(prefix.queries, model.fine_queries(hidden, T))
        torch.testing.assert_close(prefix.queries[:, 0], model.q_init.expand(B, -1))
        torch.testing.assert_close(prefix.queries[:, 1], model.llm_to_query(hidden[:, 1]))
        torch.testing.assert_close(prefix.last_hidden, hidden[:, -1], atol=1e-5, rtol=1e-4)
        # One ordinary fine pass with these queries rebuilds the same tokens and attention.
        hidden2, attn = model.run_pass(dino, prefix.queries, FINE, seq[:, :0])
        torch.testing.assert_close(attn, prefix.attention[0])
        torch.testing.assert_close(hidden2, hidden, atol=1e-5, rtol=1e-4)
    # The cached caption after the frame-by-frame prefix equals a naive re-run on that pass.
    got = generate_captions(model, dino, -1, max_tokens=MAX_TOKENS, mode="autoregressive")
    assert got == naive_greedy(model, dino, "autoregressive", MAX_TOKENS, queries=prefix.queries).tolist()


@pytest.mark.parametrize("mode", MODES)
def test_stops_at_eos_per_sample(model, dino, eos_id, mode):
    # Without EOS every sample runs to max_tokens: one LM-head call per token, none wasted.
    ref, calls = generate_forced(model, dino, eos_id, {}, max_tokens=MAX_TOKENS, mode=mode)
    assert [len(c) for c in ref] == [MAX_TOKENS] * B and calls == MAX_TOKENS
    # Sample 0 emits EOS as its 3rd token, sample 1 as its 6th: they stop, sample 2 goes on,
    # and what each sample generated before stopping is unchanged.
    got, calls = generate_forced(model, dino, eos_id, {0: 2, 1: 5}, max_tokens=MAX_TOKENS, mode=mode)
    assert [len(c) for c in got] == [2, 5, MAX_TOKENS] and calls == MAX_TOKENS
    assert got == [ref[0][:2], ref[1][:5], ref[2]]
    assert all(eos_id not in c for c in got)
    # Once every sample is done, decoding ends.
    got, calls = generate_forced(model, dino, eos_id, {0: 1, 1: 3, 2: 0}, max_tokens=MAX_TOKENS, mode=mode)
    assert got == [ref[0][:1], ref[1][:3], []] and calls == 4


def test_max_tokens_caps_length(model, dino, eos_id):
    assert generate_captions(model, dino, -1, max_tokens=0) == [[]] * B
    short = generate_captions(model, dino, -1, max_tokens=3)
    long = generate_captions(model, dino, -1, max_tokens=MAX_TOKENS)
    assert [len(c) for c in short] == [3] * B
    assert short == [c[:3] for c in long]


@pytest.mark.parametrize("mode", MODES)
def test_batch_matches_single_samples(model, dino, mode):
    batched = generate_captions(model, dino, -1, max_tokens=MAX_TOKENS, mode=mode)
    single = [generate_captions(model, dino[i : i + 1], -1, max_tokens=MAX_TOKENS, mode=mode)[0] for i in range(B)]
    assert batched == single


def test_sampling(model, dino):
    def sample(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return generate_captions(model, dino, -1, max_tokens=MAX_TOKENS, generator=g, **kw)

    assert sample(0, temperature=1.0) == sample(0, temperature=1.0)
    assert sample(0, temperature=1.0) != sample(1, temperature=1.0)
    # Top-1 sampling is greedy decoding, whatever the temperature.
    assert sample(0, temperature=2.0, top_k=1) == generate_captions(model, dino, -1, max_tokens=MAX_TOKENS)
    # Top-k never picks a token outside the k most likely at that step (checked at step 1).
    first = generate_captions(model, dino, -1, max_tokens=1, temperature=5.0, top_k=3,
                              generator=torch.Generator().manual_seed(2))
    prefix = build_prefix(model, dino, "fine")
    with torch.inference_mode():
        top3 = model.lm.get_output_embeddings()(prefix.last_hidden).topk(3).indices
    assert all(first[i][0] in top3[i].tolist() for i in range(B))


def test_restores_training_mode_and_validates(model, dino, eos_id):
    model.train()
    model.lm.eval()  # a mixed state survives too
    try:
        generate_captions(model, dino, eos_id, max_tokens=2)
        assert model.training and not model.lm.training and model.proj.training
    finally:
        model.eval()
    with pytest.raises(ValueError, match="mode"):
        generate_captions(model, dino, eos_id, mode="medium")
    with pytest.raises(ValueError, match="temperature"):
        generate_captions(model, dino, eos_id, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        generate_captions(model, dino, eos_id, temperature=1.0, top_k=0)
