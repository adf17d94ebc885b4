"""The trainer's parts on their own: the weight-decay rule, device transfer, the run configuration."""

from __future__ import annotations

import re

import click
import pytest
import torch
from click.testing import CliRunner

from fvlm_data.dataset import CaptionCollator, FeatureDataset, to_device
from fvlm_data.environment import Launch
from fvlm_model import FoveatedVLM, ModelConfig, load_lm
from fvlm_train import TrainError
from fvlm_train.checkpoint import Checkpoint, rng_state
from fvlm_train.config import RunConfig, check_split, check_store, click_options, held_out_fingerprint, resolve
from fvlm_train.data import TrainBatches
from fvlm_train.distributed import init_distributed
from fvlm_train.step import decays, make_optimizer
from tests.helpers.numbered_store import build_store


def test_weight_decay_rule():
    """Weight matrices decay; queries, embeddings, norms, biases, latent_init and q_init do not."""
    lm, _ = load_lm("tiny")
    model = FoveatedVLM(lm, ModelConfig(dino_dim=32, latent_size=7))
    named = dict(model.named_parameters())
    never = ["q_static", "q_init", "latent_init", "mode_embed", "lm.model.embed_tokens.weight", "lm.model.norm.weight",
             "lm.model.layers.0.input_layernorm.weight", "proj.bias", "llm_to_query.bias", "head.encoder.0.bias"]
    always = ["w_q.weight", "proj.weight", "llm_to_query.weight", "lm.model.layers.0.self_attn.q_proj.weight",
              "lm.model.layers.0.mlp.down_proj.weight", "head.film.weight", "head.encoder.0.weight"]
    for name in never:
        assert not decays(name, named[name]), name
    for name in always:
        assert decays(name, named[name]), name
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.01, device=torch.device("cpu"))
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert {n for n, p in named.items() if id(p) in decayed} == {n for n, p in named.items() if decays(n, p)}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(named)  # every parameter, once


def test_to_device_keeps_the_stored_half_precision(tmp_path):
    """No fp32 round trip: float16 features arrive as float16 (the model converts them once);
    int8 features are dequantised to float16."""
    _, tokenizer = load_lm("tiny")
    collate = CaptionCollator(tokenizer)
    ds = FeatureDataset(build_store(tmp_path / "h.zarr", n=2), num_frames=4, split="all")
    batch = collate([ds[0], ds[1]])
    moved = to_device(batch, torch.device("cpu"))
    assert moved["dino"].dtype == torch.float16
    torch.testing.assert_close(moved["dino"], batch["dino"], rtol=0, atol=0)
    q = FeatureDataset(build_store(tmp_path / "q.zarr", n=2, feature_dtype="int8"), num_frames=4, split="all")
    quantised = to_device(collate([q[0], q[1]]), torch.device("cpu"))
    assert quantised["dino"].dtype == torch.float16 and "dino_scale" not in quantised
    torch.testing.assert_close(quantised["dino"].float(), moved["dino"].float(), rtol=1 / 127, atol=1e-3)


def test_resolve_takes_the_checkpoint_values_and_refuses_other_models():
    saved = RunConfig(preset="tiny", num_frames=4, fine_iterations=1, lr=3e-4, val_fraction=0.25)
    got = resolve({"lr": None, "num_frames": None, "max_steps": 50}, saved)
    assert (got.lm_id, got.num_frames, got.fine_iterations, got.lr, got.max_steps) == ("tiny", 4, 1, 3e-4, 50)
    assert resolve({}, None) == RunConfig()
    with pytest.raises(TrainError, match=r"another model \(fine_iterations: checkpoint 1, now 2\)"):
        resolve({"fine_iterations": 2}, saved)
    with pytest.raises(TrainError, match="lm: checkpoint 'tiny', now 'HuggingFaceTB/SmolLM2-135M-Instruct'"):
        resolve({"preset": "default"}, saved)
    # The next-frame head and the caption weight are the model's too; a checkpoint from before they
    # existed was trained with their defaults (the seed's head, captions weighted 1) and says so.
    old = RunConfig.from_dict({k: v for k, v in saved.to_dict().items() if k not in ("recon_head", "lambda_caption")})
    assert (old.recon_head, old.lambda_caption) == ("film", 1.0) and resolve({}, old) == old
    with pytest.raises(TrainError, match="lambda_caption: checkpoint 1.0, now 0.0; recon_head: checkpoint 'film', now"):
        resolve({"recon_head": "delta", "lambda_caption": 0.0}, old)
    with pytest.raises(TrainError, match="the loss would be 0"):
        resolve({"lambda_caption": 0.0, "lambda_recon": 0.0}, None)


def test_store_and_split_checks_name_both_values():
    saved = RunConfig(store={"dino": "tiny", "vae": "tiny", "dino_dim": 384},
                      held_out=held_out_fingerprint(["a", "b"], 0.25))
    assert check_store(saved, {"dino": "tiny", "vae": "tiny", "dino_dim": 384}, "s.zarr") == []
    with pytest.raises(TrainError, match="dino: checkpoint's store 'tiny', s.zarr 'facebook/dinov2-small'"):
        check_store(saved, {"dino": "facebook/dinov2-small", "vae": "tiny", "dino_dim": 384}, "s.zarr")
    diffs = check_store(saved, {"dino": "x", "vae": "tiny", "dino_dim": 384}, "s.zarr", allow_other=True)
    assert diffs == ["dino: checkpoint's store 'tiny', s.zarr 'x'"]
    with pytest.raises(TrainError, match="dino_dim"):  # other shapes: never, even when asked
        check_store(saved, {"dino": "tiny", "vae": "tiny", "dino_dim": 768}, "s.zarr", allow_other=True)
    check_split(saved, held_out_fingerprint(["b", "a"], 0.25), "")  # the same ids in another order
    with pytest.raises(TrainError, match=r"checkpoint val_fraction 0.25 \(2 videos.*now 0.25 \(3 videos"):
        check_split(saved, held_out_fingerprint(["a", "b", "c"], 0.25), "")


@pytest.fixture
def hub_calls(monkeypatch) -> dict[str, list]:
    """Records what loading a language model asks of the hub: each probe (`hub_reachable`, as fvlm_model.lm calls
    it, answering as it really does) and each `from_pretrained` call with whether it was local only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import fvlm_model.lm as lm

    calls: dict[str, list] = {"probes": [], "loads": []}
    probe = lm.hub_reachable

    def counted_probe(*args, **kwargs) -> bool:
        calls["probes"].append(probe(*args, **kwargs))
        return calls["probes"][-1]

    monkeypatch.setattr(lm, "hub_reachable", counted_probe)
    for cls in (AutoTokenizer, AutoModelForCausalLM):
        def recorded(*args, _load=cls.from_pretrained, _name=cls.__name__, **kwargs):
            calls["loads"].append((_name, kwargs.get("local_files_only", False)))
            return _load(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", recorded)
    return calls


def test_unreachable_hub_fails_fast(monkeypatch, hub_calls):
    """A hub model that is not cached, with the hub unreachable: one line with what to do, at once: one probe of
    the hub, which fails, and no download attempt (the hub client alone retries for ~45 s). The endpoint is a
    closed local port."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ValueError, match="not in the local Hugging Face cache and the hub cannot be reached") as e:
        load_lm("fvlm-tests/no-such-model")
    assert "--lm PATH" in str(e.value) and "\n" not in str(e.value)
    assert hub_calls["probes"] == [False]
    assert hub_calls["loads"] and all(local for _, local in hub_calls["loads"]), hub_calls["loads"]
    with pytest.raises(ValueError, match="no such folder"):
        load_lm("./no/such/folder")


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "no network"])
def test_hub_less_default_lm_asks_the_hub_at_most_once(monkeypatch, hub_calls, offline):
    """The default (hub) LM where it is not cached and there is no hub (train.py's first contact without network,
    tests/test_train.py::test_first_contact_errors): HF_HUB_OFFLINE set, the hub is not probed; unset, one probe
    that fails decides. Either way only the local cache is asked, never the hub (whose client retries)."""
    import fvlm_model.lm as lm

    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(lm, "hub_reachable", lambda *a, **k: hub_calls["probes"].append(False) or False)
    with pytest.raises(ValueError, match=f"cannot load language model '{lm.DEFAULT_LM}'") as e:
        load_lm(lm.DEFAULT_LM)
    where = "HF_HUB_OFFLINE is set" if offline == "HF_HUB_OFFLINE" else "the hub cannot be reached from here"
    assert where in str(e.value) and "--lm PATH" in str(e.value)
    assert hub_calls["probes"] == ([] if offline == "HF_HUB_OFFLINE" else [False])
    assert hub_calls["loads"] and all(local for _, local in hub_calls["loads"]), hub_calls["loads"]


def test_bad_checkpoint_files_say_what_they_are(tmp_path):
    cases = {"empty.pt": (b"", "is empty (0 bytes)"),
             "notes.pt": (b"these are my notes\n", "is not a checkpoint (not a file torch.save writes)"),
             "random.pt": (bytes(range(256)) * 16, "is not a checkpoint (not a file torch.save writes)")}
    for name, (data, text) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(TrainError, match=re.escape(text)) as e:
            Checkpoint.load(tmp_path / name)
        assert "weights_only" not in str(e.value) and "\n" not in str(e.value)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(TrainError, match="is not an fvlm checkpoint"):
        Checkpoint.load(tmp_path / "foreign.pt")
    torch.save({"format": "fvlm-checkpoint", "version": 1}, tmp_path / "old.pt")
    with pytest.raises(TrainError, match="checkpoint version 1"):
        Checkpoint.load(tmp_path / "old.pt")


def test_checkpoint_saves_and_restores_every_field(tmp_path):
    """The record round-trips through the version-2 file layout (its keys on disk are fixed), the
    latest link follows the newest step, `keep` step files stay, and a file missing a key is one line."""
    config = RunConfig(preset="tiny", num_frames=4, held_out=held_out_fingerprint(["a", "b"], 0.25))
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    for step in (7, 8, 9):
        ckpt = Checkpoint(config, model.state_dict(), optimizer.state_dict(), step=step, epoch=2, micro_in_epoch=3,
                          nonfinite_total=1, rng=rng_state(torch.device("cpu")))
        path = ckpt.save(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob("checkpoint_step*.pt")) == ["checkpoint_step00000008.pt", path.name]
    assert path.name == "checkpoint_step00000009.pt" and (tmp_path / "checkpoint_latest.pt").samefile(path)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"format", "version", "config", "model", "optimizer", "step", "epoch", "micro_in_epoch",
                        "nonfinite_total", "rng"}
    assert (raw["format"], raw["version"], raw["config"]) == ("fvlm-checkpoint", 2, config.to_dict())
    back = Checkpoint.load(tmp_path / "checkpoint_latest.pt")
    assert back.config == config and (back.step, back.epoch, back.micro_in_epoch, back.nonfinite_total) == (9, 2, 3, 1)
    assert all(torch.equal(back.model[k], v) for k, v in model.state_dict().items())
    assert torch.equal(back.optimizer["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(back.rng["torch"], ckpt.rng["torch"])
    torch.save({k: v for k, v in raw.items() if k != "rng"}, tmp_path / "partial.pt")
    with pytest.raises(TrainError, match="partial.pt lacks rng: give a checkpoint_"):
        Checkpoint.load(tmp_path / "partial.pt")


def saved_run(tmp_path, steps=(2, 4)) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A run folder with a checkpoint of each step of `steps`, of a model whose weights are most of its bytes."""
    model = torch.nn.Linear(256, 256)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 256)).sum().backward()
    optimizer.step()
    for step in steps:
        Checkpoint(RunConfig(preset="tiny"), model.state_dict(), optimizer.state_dict(), step=step, epoch=0,
                   micro_in_epoch=step, nonfinite_total=0, rng=rng_state(torch.device("cpu"))).save(tmp_path, keep=3)
    return model, optimizer


def test_flipped_bytes_in_a_checkpoint_are_found_and_named(tmp_path):
    """torch.load does not check the zip's CRCs: 8 flipped bytes in the tensors load silently without this check."""
    saved_run(tmp_path)
    latest = tmp_path / "checkpoint_latest.pt"
    data = bytearray(latest.read_bytes())
    middle = len(data) // 2
    data[middle: middle + 8] = bytes(b ^ 0xFF for b in data[middle: middle + 8])
    latest.write_bytes(data)  # the same inode: checkpoint_step00000004.pt too
    torch.load(latest, weights_only=True)  # what it used to do: loads, the flipped bytes in some tensor
    with pytest.raises(TrainError) as e:
        Checkpoint.load(latest)
    message = str(e.value)
    assert "\n" not in message and f"{latest} is damaged (bad CRC-32 of " in message, message
    assert f"{tmp_path} holds the checkpoints of steps 2 (intact) and 4 (damaged)" in message, message
    assert f"--resume {tmp_path / 'checkpoint_step00000002.pt'}" in message, message
    assert Checkpoint.load(tmp_path / "checkpoint_step00000002.pt").step == 2


@pytest.mark.parametrize("edit, text", [
    (lambda c: c.update(config=None), "its config is None, not a run configuration"),
    (lambda c: c.update(config="tiny"), "its config is 'tiny', not a run configuration"),
    (lambda c: c["config"].update(num_frames="4"), "its config's num_frames is '4' (str), not int"),
    (lambda c: c["config"].update(recon_head="nope"), "its config's recon_head is 'nope': 'nope' is not one of"),
    (lambda c: c["config"].update(max_hours=None, store=[]), "its config's store is [] (list), not dict"),
    (lambda c: c.update(step="6"), "its step is '6' (str), not a whole number >= 0"),
    (lambda c: c.update(epoch=-1), "its epoch is -1 (int), not a whole number >= 0"),
    (lambda c: c.update(model=[]), "its model is [] (list), not a mapping of names to tensors"),
    (lambda c: c["model"].pop("bias"), "its model lacks 'bias' (the model has 2 tensors, it has 1)"),
    (lambda c: c["model"].update(extra=torch.zeros(1)), "its model has 'extra', which the model lacks"),
    (lambda c: c["model"].update(weight=torch.zeros(256, 255)),
     "its model's 'weight' has shape [256, 255], the model's [256, 256]"),
    (lambda c: c.update(optimizer={}), "its optimizer state lacks 'state', 'param_groups'"),
    (lambda c: c["optimizer"]["state"][0].update(exp_avg=torch.zeros(3)),
     "its optimizer state of parameter 0 has 'exp_avg' of shape [3], the parameter's [256, 256]"),
    (lambda c: c["optimizer"].update(param_groups=[]), "its optimizer state does not fit the model's optimizer"),
    (lambda c: c["rng"].update(torch=torch.zeros(7, dtype=torch.uint8)),
     "its random state 'torch' has 7 bytes of uint8, this torch's has 5056"),
    (lambda c: c.update(rng={}), "its random state lacks 'torch'"),
])
def test_hand_edited_checkpoints_say_what_is_wrong(tmp_path, edit, text):
    model, optimizer = saved_run(tmp_path, steps=(2,))
    raw = torch.load(tmp_path / "checkpoint_latest.pt", weights_only=True)
    edit(raw)
    path = tmp_path / "edited.pt"
    torch.save(raw, path)
    with pytest.raises(TrainError) as e:
        Checkpoint.load(path).restore(model, optimizer, torch.device("cpu"))
    assert str(e.value).startswith(f"{path}: {text}") and "\n" not in str(e.value), str(e.value)


def test_one_process_unless_torchrun_started_several(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed() == Launch(rank=0, world_size=1, local_rank=0, local_world_size=1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TrainError, match="WORLD_SIZE is 2 but .* start several processes with torchrun"):
        init_distributed()


def test_options_are_checked_by_click_and_all_have_help():
    @click.command()
    @click_options
    def cli(**given):
        click.echo(repr(given["val_fraction"]))

    result = CliRunner().invoke(cli, ["--val-fraction", "1.5"])
    assert result.exit_code == 2 and "1.5 is not in the range 0.0<=x<=1.0" in result.output
    assert CliRunner().invoke(cli, []).output.strip() == "None"  # not given: the checkpoint's, else the default
    assert all(p.help for p in cli.params)


def test_no_training_videos_is_one_line(tmp_path):
    _, tokenizer = load_lm("tiny")
    ds = FeatureDataset(build_store(tmp_path / "s.zarr", n=4), num_frames=4, split="train", val_fraction=1.0)
    with pytest.raises(TrainError, match="0 training videos over 1 process"):
        TrainBatches(ds, CaptionCollator(tokenizer), 2, 0, seed=0, rank=0, world=1, pin=False)
