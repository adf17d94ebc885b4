"""The loader (batches read in place, shared memory in workers), the step without host reads, the
LM's causal attention under compile, and training/evaluation with several captions per video."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fvlm_data import CaptionCollator, FeatureDataset, FeatureStore
from fvlm_data.store import FeatureShapes
from fvlm_data.store.writer import StoreWriter
from fvlm_model import load_lm
from fvlm_model.evaluation import bootstrap_ratio_ci
from fvlm_train.checkpoint import build_model
from fvlm_train.config import RunConfig
from fvlm_train.data import TrainBatches, make_loader
from fvlm_train.evaluation import evaluate
from fvlm_train.progress import IntervalLog
from fvlm_train.step import count_host_reads, train_step
from tests.helpers.store_helpers import write_rows

SHAPES = FeatureShapes(6, {"dino": (5, 8), "latents": (4, 7, 7)})
WORDS = ["red", "green", "blue", "circle", "square", "moves", "left", "right", "a", "the"]


def build_store(path, n=24, lists=False):
    """n videos; with `lists`, three captions each (the first is `caption`), in the caption table."""
    attrs = dict(dino="tiny", vae="tiny", num_frames=6, image_size=56, feature_dtype="float16", dino_tokens=5,
                 dino_dim=8, latent_shape=[4, 7, 7])
    store = StoreWriter.create_or_open(path, attrs, SHAPES, capacity=n, shard_videos=8)
    rng = np.random.default_rng(0)

    def row(i: int) -> dict:
        caption = " ".join(rng.choice(WORDS, size=2 + i % 4).tolist())
        return dict(dino=rng.standard_normal((6, 5, 8)), latents=np.full((6, 4, 7, 7), float(i)), caption=caption,
                    captions=[caption, caption + " left", "the " + caption] if lists else (), video_id=f"v{i:03d}",
                    source=f"/v/{i}.mp4", timestamps=np.arange(6) + 0.5, duration=6.0)

    write_rows(store, ((i, row(i)) for i in range(n)))
    return path


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("ls") / "s.zarr")


@pytest.fixture(scope="module")
def listed_store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("ls") / "lists.zarr", lists=True)


def tiny(store_path):
    config = RunConfig(preset="tiny", num_frames=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, tokenizer = build_model(config, FeatureStore.open(store_path).attrs)
    return model, tokenizer


def test_batches_are_read_in_place_and_shared_by_workers(store_path):
    ds = FeatureDataset(store_path, num_frames=4, split="all")
    tokenizer = load_lm("tiny")[1]
    collate = CaptionCollator(tokenizer)
    items = collate(ds.__getitems__([3, 0, 5]))
    batch = collate(ds.read_batch([3, 0, 5]))
    for k in ("dino", "latents", "input_ids", "labels", "index"):
        assert torch.equal(batch[k], items[k]), k
    assert batch["captions"] == items["captions"] and batch["video_ids"] == items["video_ids"]
    store = FeatureStore.open(store_path)
    out = {n: np.zeros((2, 4, *store.arrays[n].shape[2:]), store.arrays[n].dtype) for n in ("dino", "latents",
                                                                                             "timestamps")}
    rows = store.read_slots([1, 2], [np.arange(4), np.arange(4)], out)
    assert np.shares_memory(rows[1]["dino"], out["dino"]) and out["latents"][1, 0, 0, 0, 0] == 2
    with pytest.raises(ValueError, match="one .slots, frames"):
        store.read_slots([1], [np.arange(3)], out)
    loader = make_loader(ds, collate, 8, 1, None, False)
    for _ in range(2):  # the worker persists from one pass to the next
        got = [b for b in loader]
        assert all(b["dino"].is_shared() for b in got)  # written by the worker in shared memory: not copied
        assert sorted(sum((b["index"].tolist() for b in got), [])) == list(range(len(ds)))


def test_non_logging_step_reads_nothing_back_and_a_bad_step_is_skipped(store_path):
    model, tokenizer = tiny(store_path)
    ds = FeatureDataset(store_path, num_frames=4, split="all")
    batch = CaptionCollator(tokenizer)(ds.read_batch(list(range(4))))
    from fvlm_train.step import make_optimizer

    optimizer = make_optimizer(model, 1e-3, 0.01, torch.device("cpu"))
    log = IntervalLog(torch.device("cpu"))
    train_step(model, model, optimizer, [batch], 1.0, read=False)  # first step: optimizer state is created
    with count_host_reads() as reads:
        result = train_step(model, model, optimizer, [batch], 1.0, read=False)
        log.add(result, 4)
    assert reads == {}, reads
    with count_host_reads() as reads:  # the counter does see reads (what read=True does once per step)
        train_step(model, model, optimizer, [batch], 1.0)
    assert reads["cpu"] == 1 and reads["__float__"] == 2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    steps = [s["step"].clone() for s in optimizer.state.values()]
    bad = {**batch, "dino": batch["dino"].clone().fill_(float("nan"))}
    with count_host_reads() as reads:
        result = train_step(model, model, optimizer, [bad], 1.0, read=False)
        log.add(result, 4)
    assert reads == {}
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # skipped, on the device
    assert [s["step"] for s in optimizer.state.values()] == steps
    assert log.counts() == 1 and log.nonfinite_total == 1 and log.longest_run == 1


def test_compiled_attention_reaches_sdpa_causal_without_a_mask(store_path):
    model, tokenizer = tiny(store_path)
    calls = []

    def backend(gm, example_inputs):
        calls.extend(n.kwargs for n in gm.graph.nodes if n.op == "call_function"
                     and "scaled_dot_product_attention" in str(n.target))
        return gm.forward

    ds = FeatureDataset(store_path, num_frames=4, split="all")
    batch = CaptionCollator(tokenizer)(ds.read_batch([0, 1]))
    torch._dynamo.reset()
    try:
        tensors = {k: v for k, v in batch.items() if torch.is_tensor(v)}  # what the training step gives it
        out = torch.compile(model, backend=backend, dynamic=False)(tensors)
    finally:
        torch._dynamo.reset()
    assert calls and all(c["is_causal"] is True and c["attn_mask"] is None and c["enable_gqa"] for c in calls)
    model.lm.set_attn_implementation("sdpa")  # transformers' own path: the same numbers
    ref = model(batch)
    torch.testing.assert_close(out["loss"], ref["loss"], rtol=1e-5, atol=1e-6)


def test_caption_chosen_for_a_sample_repeats_after_resume(listed_store):
    store_path = listed_store
    tokenizer = load_lm("tiny")[1]
    ds = FeatureDataset(store_path, num_frames=4, split="all", seed=5)
    collate = CaptionCollator(tokenizer)
    run = TrainBatches(ds, collate, 4, 0, seed=5, rank=0, world=1, pin=False)
    seq = [next(run)["captions"] for _ in range(9)]  # two epochs of 6 batches, and some
    chosen = {c for batch in seq for c in batch}
    assert any(c.endswith(" left") for c in chosen) and any(c.startswith("the ") for c in chosen)
    resumed = TrainBatches(ds, collate, 4, 1, seed=5, rank=0, world=1, pin=False, epoch=0, micro_in_epoch=4)
    assert [next(resumed)["captions"] for _ in range(5)] == seq[4:]


def test_evaluation_scores_every_caption_per_video(listed_store):
    store_path = listed_store
    assert FeatureStore.open(store_path).read(0)["captions"][1].endswith(" left")  # from the caption table
    model, tokenizer = tiny(store_path)
    collate = CaptionCollator(tokenizer)
    ds = FeatureDataset(store_path, num_frames=4, split="all")
    cpu = torch.device("cpu")
    m = evaluate(model, make_loader(ds.with_captions(), collate, 8, 0, None, False), cpu)
    assert (m["num_videos"], m["num_captions"]) == (24, 72)
    assert evaluate(model, make_loader(ds.with_captions(2), collate, 8, 0, None, False), cpu)["num_captions"] == 48
    sums, tokens = np.zeros(2), 0.0
    for j in range(3):  # the definition: per video, sums over its captions; ratios of sums over videos
        items = [{**it, "caption": it["captions"][j]} for it in ds.__getitems__(list(range(24)))]
        out = model.eval()(collate(items), score_all_passes=True)
        sums += out["cap_sum"].double().sum(1)[[0, -1]].detach().numpy()
        tokens += float(out["cap_tokens"].sum())
    assert m["cap_coarse"] == pytest.approx(sums[0] / tokens, rel=1e-5)
    assert m["cap_fine"] == pytest.approx(sums[1] / tokens, rel=1e-5)


def test_evaluation_with_one_caption_per_video_gives_todays_numbers(store_path):
    model, tokenizer = tiny(store_path)
    collate = CaptionCollator(tokenizer)
    ds = FeatureDataset(store_path, num_frames=4, split="all")
    cpu = torch.device("cpu")
    today = evaluate(model, DataLoader(ds, batch_size=8, collate_fn=collate), cpu)  # items, stacked
    now = evaluate(model, make_loader(ds.with_captions(), collate, 8, 1, None, False), cpu)
    assert now.pop("num_captions") == 24 and today.pop("num_captions") == 24
    assert now == today
    # ... and what the evaluation before caption lists computed: per-video sums straight from the model,
    # ratios of sums, the bootstrap over the videos in order.
    cap, tok = [], []
    for start in range(0, 24, 8):
        b = collate(ds.__getitems__(list(range(start, start + 8))))
        out = model.eval()(b, score_all_passes=True)
        cap.append(out["cap_sum"].double().detach())
        tok.append(out["cap_tokens"].double())
    cap_sum, tokens = torch.cat(cap, 1).numpy(), torch.cat(tok).numpy()
    assert now["cap_coarse"] == pytest.approx(cap_sum[0].sum() / tokens.sum(), rel=1e-6)
    assert now["cap_ratio_ci"] == pytest.approx(list(bootstrap_ratio_ci(cap_sum[0], cap_sum[-1])), rel=1e-6)


def test_int8_batches_read_in_place_dequantise_as_before(tmp_path):
    from fvlm_data.dataset import to_device
    from tests.helpers.numbered_store import build_store as build_int8

    path = build_int8(tmp_path / "q.zarr", n=8, feature_dtype="int8")
    ds = FeatureDataset(path, num_frames=4, split="all")
    collate = CaptionCollator(load_lm("tiny")[1])
    (batch,) = list(make_loader(ds, collate, 8, 0, None, False))
    before = collate(ds.__getitems__(list(range(8))))
    assert batch["dino"].dtype == torch.int8 and torch.equal(batch["dino_scale"], before["dino_scale"])
    cpu = torch.device("cpu")
    torch.testing.assert_close(to_device(batch, cpu)["dino"], to_device(before, cpu)["dino"], rtol=0, atol=0)
