"""Tests of fvlm_model on the tiny preset: a real, random-initialised small Llama, no mocks."""

import math
from dataclasses import asdict

import pytest
import torch
from transformers import LlamaForCausalLM

from fvlm_model import (
    RECON_HEADS,
    FiLMPredictionHead,
    FoveatedVLM,
    HiddenPredictionHead,
    build_tokenizer_tiny,
    load_lm,
    smollm2_135m_config,
)
from fvlm_model.model import ModelConfig
from tests.helpers.model import CAPTIONS, LATENT, B, D, N, T, make_batch, make_model


@pytest.fixture(scope="module")
def tokenizer():
    return load_lm("tiny")[1]


# ---- language model and tokenizer ------------------------------------------------------------


def as_batch(dino, latents, input_ids, labels) -> dict:
    """A batch as the model takes it: one mapping, keyed as the dataset keys it."""
    return {"dino": dino, "latents": latents, "input_ids": input_ids, "labels": labels}


def test_tiny_tokenizer():
    tok = build_tokenizer_tiny(["Red", "square", "moves", "red"])
    assert tok.pad_token == "<pad>" and tok.eos_token == "<|endoftext|>"
    assert tok.pad_token_id != tok.eos_token_id
    ids = tok("A RED square moves").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["a", "red", "square", "moves"]
    # Unknown ascii words spell out in characters, never <unk>, and decode back.
    ids = tok("zebra-42 jumps!").input_ids
    assert tok.unk_token_id not in ids
    assert tok.decode(ids).replace(" ", "") == "zebra-42jumps!"
    assert tok.eos_token_id not in ids  # EOS is the collate's job
    words = ["red", "box", "red"]
    assert build_tokenizer_tiny(words).get_vocab() == build_tokenizer_tiny(list(words)).get_vocab()


def test_load_tiny_is_deterministic_and_keeps_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    lm1, tok = load_lm("tiny")
    assert torch.equal(torch.rand(3), expected)  # caller's RNG stream untouched
    lm2, _ = load_lm("tiny")
    for (n1, p1), (_, p2) in zip(lm1.state_dict().items(), lm2.state_dict().items(), strict=True):
        assert torch.equal(p1, p2), n1
    assert lm1.config.vocab_size == len(tok)
    assert lm1.config.tie_word_embeddings
    assert lm1.get_output_embeddings().weight is lm1.get_input_embeddings().weight


def test_load_lm_bad_id_raises_value_error():
    with pytest.raises(ValueError, match=r"^cannot load language model '/nonexistent/dir/model': ") as e:
        load_lm("/nonexistent/dir/model")
    assert "\n" not in str(e.value)


def test_load_lm_from_directory_fixes_pad_and_dtype(tmp_path):
    lm, tok = load_lm("tiny")
    tok.pad_token = tok.eos_token  # the SmolLM2 situation: pad == EOS
    lm.to(torch.bfloat16).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    lm2, tok2 = load_lm(str(tmp_path))
    assert tok2.pad_token_id not in (None, tok2.eos_token_id)
    assert tok2.padding_side == "right"
    assert next(lm2.parameters()).dtype == torch.float32


def test_smollm2_config_shape():
    cfg = smollm2_135m_config()
    with torch.device("meta"):
        lm = LlamaForCausalLM(cfg)
    assert sum(p.numel() for p in lm.parameters()) == 134_515_008  # SmolLM2-135M
    assert cfg.hidden_size == 576 and cfg.num_key_value_heads == 3 and cfg.tie_word_embeddings


# ---- the foveated model ----------------------------------------------------------------------


def test_shapes_and_attention_rows(tokenizer):
    model = make_model()
    dino, latents, input_ids, labels = make_batch(tokenizer)
    out = model(as_batch(dino, latents, input_ids, labels))
    P = 3
    assert out["loss"].shape == () and out["loss"].requires_grad
    for key in ("cap_coarse", "cap_fine", "rec_coarse", "rec_fine"):
        assert out[key].shape == () and torch.isfinite(out[key])
    assert out["cap_passes"].shape == out["rec_passes"].shape == (P,)
    assert out["cap_per_sample"].shape == out["rec_per_sample"].shape == (P, B)
    assert out["attention"].shape == (P, B, T, N)
    assert out["pred_latents"].shape == (P, B, T, *LATENT)
    torch.testing.assert_close(out["attention"].sum(-1), torch.ones(P, B, T))
    assert out["cap_coarse"] == out["cap_passes"][0] and out["cap_fine"] == out["cap_passes"][-1]
    assert out["cap_passes"][1].isnan() and out["cap_sum"][1].isnan().all()  # intermediate pass: not scored
    counts = (labels != -100).sum(1)
    torch.testing.assert_close(out["cap_tokens"], counts)
    torch.testing.assert_close(out["cap_sum"].sum(1) / counts.sum(), out["cap_passes"], equal_nan=True)
    # The loss is the documented combination of the coarse and the last fine pass.
    lr, lc = 0.1, 1.0
    expected = (out["cap_fine"] + lr * out["rec_fine"]) + lc * (out["cap_coarse"] + lr * out["rec_coarse"])
    torch.testing.assert_close(out["loss"].detach(), expected)
    # Per-sample caption means weight each sample's tokens: the token-weighted average is the batch loss.
    counts = counts.float()
    torch.testing.assert_close((out["cap_per_sample"] * counts).sum(1) / counts.sum(), out["cap_passes"],
                               equal_nan=True)


def test_intermediate_pass_without_caption_changes_no_trained_number(tokenizer):
    """The intermediate fine pass only makes the next queries: run without the caption it gives the
    same last-pass queries, losses and gradients as run with it (causal: visual positions never see
    the caption)."""
    batch = make_batch(tokenizer)
    lean, full = make_model(), make_model()
    out, ref = lean(as_batch(*batch)), full(as_batch(*batch), score_all_passes=True)
    assert torch.isfinite(ref["cap_passes"]).all()
    for k in ("loss", "cap_coarse", "cap_fine", "rec_passes", "last_queries", "attention"):
        torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    out["loss"].backward()
    ref["loss"].backward()
    for (name, p), q in zip(lean.named_parameters(), full.parameters(), strict=True):
        if p.grad is not None or q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_loss_normalisers(tokenizer):
    """cap_tokens / num_videos replace the batch's own counts (a step over micro-batches passes its totals)."""
    model = make_model()
    batch = make_batch(tokenizer)
    with torch.no_grad():
        out = model(as_batch(*batch))
        tokens = out["cap_tokens"].sum().float()
        half = model(as_batch(*batch), cap_tokens=2 * tokens, num_videos=torch.tensor(2.0 * B))
    torch.testing.assert_close(half["loss"], out["loss"] / 2)


def test_attention_scores_are_fp32_under_bf16_autocast(tokenizer):
    """Sharp attention (large scores, as on trained DINO features): bf16 autocast gives the same
    attention as fp32, because scores and softmax are computed in fp32."""
    model = make_model()
    dino = (make_batch(tokenizer)[0] * 8).half().float()  # values a float16 store holds exactly
    queries = model.static_queries(B, T)
    with torch.no_grad():
        _, ref = model.encode_frames(dino, queries)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, got = model.encode_frames(dino.half(), queries)
    assert got.dtype == torch.float32 and ref.max() > 0.5  # sharp: one token takes most of the weight
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_visual_tokens_have_embedding_scale(tokenizer):
    model = make_model()
    dino = make_batch(tokenizer)[0]
    z, _ = model.encode_frames(dino, model.static_queries(B, T))
    v = model.project_visual(z * torch.tensor([1.0, 10.0, 0.1])[:, None, None])  # per-sample scales
    rms = v.pow(2).mean(-1).sqrt()
    emb_rms = model.lm.get_input_embeddings().weight.pow(2).mean().sqrt()
    torch.testing.assert_close(rms, emb_rms.expand_as(rms), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("recon_head", RECON_HEADS)
def test_no_leak_next_frame_prediction(tokenizer, recon_head):
    model = make_model(recon_head=recon_head)
    dino, latents, input_ids, labels = make_batch(tokenizer)
    with torch.no_grad():
        pred = model(as_batch(dino, latents, input_ids, labels))["pred_latents"]
        for t in range(T):
            # Changing frame t and later (features and latents) must not change predictions up to t.
            d2, l2 = dino.clone(), latents.clone()
            d2[:, t:] += torch.randn_like(d2[:, t:])
            l2[:, t:] += torch.randn_like(l2[:, t:])
            pred2 = model(as_batch(d2, l2, input_ids, labels))["pred_latents"]
            torch.testing.assert_close(pred2[:, :, : t + 1], pred[:, :, : t + 1], rtol=0, atol=1e-6)
            if t + 1 < T:
                assert not torch.allclose(pred2[:, :, t + 1], pred[:, :, t + 1])
            if t > 0:
                # ...while the previous frame's features do reach it, through the LM hidden state.
                d3 = dino.clone()
                d3[:, t - 1] += torch.randn_like(d3[:, t - 1])
                pred3 = model(as_batch(d3, latents, input_ids, labels))["pred_latents"]
                assert not torch.allclose(pred3[:, :, t], pred[:, :, t])


@pytest.mark.parametrize("recon_head", RECON_HEADS)
def test_batch_independence(tokenizer, recon_head):
    model = make_model(recon_head=recon_head)
    dino, latents, input_ids, labels = make_batch(tokenizer)
    with torch.no_grad():
        out = model(as_batch(dino, latents, input_ids, labels))
        for i in range(B):
            n = int((labels[i] != -100).sum())  # run alone, without any padding
            one = slice(i, i + 1)
            alone = model(as_batch(dino[one], latents[one], input_ids[one, :n], labels[one, :n]))
            for key in ("cap_per_sample", "rec_per_sample", "attention", "pred_latents"):
                torch.testing.assert_close(alone[key][:, 0], out[key][:, i], rtol=1e-5, atol=1e-5, msg=key,
                                           equal_nan=True)


def test_padding_ignored_eos_and_first_token_learned(tokenizer):
    model = make_model()
    dino, latents, input_ids, labels = make_batch(tokenizer)
    pad = labels == -100
    assert pad.any()
    with torch.no_grad():
        loss = model(as_batch(dino, latents, input_ids, labels))["loss"]
        # Whatever sits in padded positions does not matter.
        junk = input_ids.clone()
        junk[pad] = torch.randint(0, len(tokenizer), (int(pad.sum()),))
        torch.testing.assert_close(model(as_batch(dino, latents, junk, labels))["loss"], loss, rtol=0, atol=1e-6)
        # The first caption token is predicted (from the last visual position).
        first = labels.clone()
        first[:, 0] = (first[:, 0] + 1) % len(tokenizer)
        assert not torch.allclose(model(as_batch(dino, latents, input_ids, first))["loss"], loss)
        # EOS is a real label.
        lengths = (~pad).sum(1)
        assert (labels[torch.arange(B), lengths - 1] == tokenizer.eos_token_id).all()
        no_eos = labels.clone()
        no_eos[torch.arange(B), lengths - 1] = -100
        assert not torch.allclose(model(as_batch(dino, latents, input_ids, no_eos))["loss"], loss)


def test_fine_queries_depend_on_previous_pass(tokenizer):
    model = make_model()
    dino, latents, input_ids, labels = make_batch(tokenizer)
    d2 = dino.clone()
    d2[:, 0] += torch.randn_like(d2[:, 0])
    with torch.no_grad():
        att = model(as_batch(dino, latents, input_ids, labels))["attention"]
        att2 = model(as_batch(d2, latents, input_ids, labels))["attention"]
    torch.testing.assert_close(att2[0, :, 1:], att[0, :, 1:], rtol=0, atol=0)  # coarse: static query
    for p in (1, 2):
        assert not torch.allclose(att2[p, :, 1], att[p, :, 1])  # fine: query from frame 1's hidden


def test_loss_decreases(tokenizer):
    model = make_model().train()
    batch = make_batch(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model(as_batch(*batch))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.6 * losses[0], losses
    assert sum(losses[-5:]) < sum(losses[:5])


def test_caption_only_skips_reconstruction_graph(tokenizer):
    """lambda_recon = 0: the same losses and gradients as a vanishing lambda_recon, reconstruction
    still reported, but no graph (and no gradient) through the prediction head."""
    batch = make_batch(tokenizer)
    ref, cap_only = make_model(), make_model()
    ref.config.lambda_recon, cap_only.config.lambda_recon = 1e-30, 0.0  # 1e-30: the graph path
    out_ref, out = ref(as_batch(*batch)), cap_only(as_batch(*batch))
    for k in ("loss", "cap_coarse", "cap_fine", "rec_coarse", "rec_fine"):
        torch.testing.assert_close(out[k], out_ref[k])
    assert out["rec_fine"] > 0
    out_ref["loss"].backward()
    out["loss"].backward()
    assert all(p.grad is None for p in cap_only.head.parameters()) and cap_only.latent_init.grad is None
    for name in ("q_static", "q_init", "w_q.weight", "llm_to_query.weight", "proj.weight"):
        torch.testing.assert_close(cap_only.get_parameter(name).grad, ref.get_parameter(name).grad)


def test_bf16_autocast_and_low_precision_inputs(tokenizer):
    model = make_model()
    dino, latents, input_ids, labels = make_batch(tokenizer)
    with torch.no_grad():
        ref = model(as_batch(dino, latents, input_ids, labels))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(as_batch(dino.bfloat16(), latents.half(), input_ids, labels))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    torch.testing.assert_close(out["loss"], ref["loss"], rtol=0.05, atol=0.05)


def test_head_broadcasts_over_passes():
    head = FiLMPredictionHead(hidden_dim=16, latent_channels=4, width=8)
    assert head.encode(torch.randn(2, 5, 4, 6, 10)).shape == (2, 5, 8, 6, 10)  # any latent size
    assert head(torch.randn(3, 2, 5, 16), torch.randn(2, 5, 4, 6, 10)).shape == (3, 2, 5, 4, 6, 10)


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("size", [14, 28, 32])  # the tiny demo's 112 px, and 224 / 256 px with SD-VAE
def test_hidden_heads_at_real_sizes(residual, size):
    """The heads without x_{t-1} as input, at SmolLM2's width and the real latent sizes: all passes in one
    call; `delta` starts as copying the previous latent, `hidden` as predicting zeros."""
    head = HiddenPredictionHead(576, 4, size, residual=residual)
    prev = torch.randn(2, 3, 4, size, size)
    pred = head(torch.randn(2, 2, 3, 576), prev)  # [P, B, T, H]
    assert pred.shape == (2, 2, 3, 4, size, size)
    torch.testing.assert_close(pred, prev.expand_as(pred) if residual else torch.zeros_like(pred), rtol=0, atol=0)


def test_reconstruction_only(tokenizer):
    """lambda_caption 0: the loss is the reconstruction terms alone (the caption losses still reported), so
    the parameters only the caption reaches (the LM head, tied to the embeddings of caption tokens) get no
    gradient, while the queries do."""
    model = make_model(recon_head="delta", fine_iterations=1)
    model.config.lambda_caption = 0.0
    out = model(as_batch(*make_batch(tokenizer)))
    lr, lc = model.config.lambda_recon, model.config.lambda_coarse
    torch.testing.assert_close(out["loss"].detach(), lr * (out["rec_fine"] + lc * out["rec_coarse"]))
    assert out["cap_fine"] > 0 and torch.isfinite(out["cap_coarse"])
    out["loss"].backward()
    grad = model.lm.get_input_embeddings().weight.grad
    caption_only = sorted(set(make_batch(tokenizer)[2].flatten().tolist()))
    assert grad is None or grad[caption_only].abs().max() == 0
    assert model.q_static.grad.abs().max() > 0 and model.llm_to_query.weight.grad.abs().max() > 0


def test_config_roundtrip():
    model = make_model(fine_iterations=1)
    d = asdict(model.config)
    assert d["lm_name"] == "tiny" and d["fine_iterations"] == 1 and d["dino_dim"] == D
    assert ModelConfig(**d) == model.config
    with pytest.raises(ValueError):
        FoveatedVLM(model.lm, ModelConfig(fine_iterations=0))


def test_shuffled_query_control(tokenizer):
    """The control pass equals the real fine pass when every video in the batch is the same
    (rolling the batch then changes nothing), and differs once the videos differ."""
    model = make_model()
    dino, latents, ids, labels = make_batch(tokenizer, captions=[CAPTIONS[0]] * 3)
    same = dino[:1].expand_as(dino).contiguous()
    out = model(as_batch(same, latents[:1].expand_as(latents), ids, labels))
    control = model.shuffled_query_loss(as_batch(same, latents, ids, labels), out["last_queries"])
    torch.testing.assert_close(control, out["cap_sum"][-1], rtol=1e-5, atol=1e-5)

    out = model(as_batch(dino, latents, ids, labels))
    control = model.shuffled_query_loss(as_batch(dino, latents, ids, labels), out["last_queries"])
    assert control.shape == (3,) and not torch.allclose(control, out["cap_sum"][-1])


@pytest.mark.parametrize(("recon_head", "lambda_recon"),
                         [("film", 0.1), ("film", 0.0), ("delta", 0.1), ("hidden", 0.1)])
def test_the_model_says_when_a_parameter_gets_no_gradient(tokenizer, recon_head, lambda_recon):
    """What train.py tells DDP (find_unused_parameters) is what a backward pass really leaves without a gradient."""
    model = make_model(recon_head=recon_head, fine_iterations=1)
    model.config.lambda_recon = lambda_recon
    model(as_batch(*make_batch(tokenizer)))["loss"].backward()
    every = all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert every == model.every_parameter_gets_a_gradient()
