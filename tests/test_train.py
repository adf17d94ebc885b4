"""train.py end to end: real processes, TensorBoard event files, checkpoints, kill -9 resume, torchrun."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fvlm_data.dataset import FeatureDataset
from fvlm_data.precompute.config import PrecomputeConfig
from fvlm_data.store import FeatureShapes
from fvlm_data.store.writer import StoreWriter
from fvlm_model.evaluation import pass_metrics
from fvlm_model.model import ModelConfig
from fvlm_train import TrainError
from fvlm_train.checkpoint import load_trained
from fvlm_train.step import lr_at
from tests.helpers.in_process import invoke
from tests.helpers.small_disk import SmallDisk
from tests.helpers.store_helpers import write_row
from tests.helpers.tensorboard import scalars

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TRAIN_TAGS = {"loss", "cap_fine", "cap_coarse", "cap_ratio", "cap_improvement_pct", "rec_fine", "rec_coarse",
              "rec_ratio", "lr", "grad_norm", "samples_per_s", "peak_memory_gb"}
VAL_TAGS = {f"val/{t}" for t in ("loss", "cap_fine", "cap_coarse", "cap_ratio", "cap_improvement_pct",
                                 "rec_fine", "rec_coarse", "rec_ratio", "cap_fine_shuffled", "shuffled_ratio")}


def train_cmd(store: Path, out: Path, *extra: str, grad_accum: str | None = "1") -> list[str]:
    accum = ["--grad-accum", grad_accum] if grad_accum else []
    return [sys.executable, str(ROOT / "train.py"), "--store", str(store), "--preset", "tiny", "--batch-size", "4",
            *accum, "--out", str(out), "--num-frames", "4", "--workers", "0", "--val-fraction", "0.25", *extra]


def run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return proc


def in_process(cmd: list[str]) -> subprocess.CompletedProcess:
    return invoke("train", cmd[2:])  # train_cmd's arguments, without the interpreter and script


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store") / "s.zarr"
    run([sys.executable, str(ROOT / "precompute.py"), "--out", str(out), "--preset", "tiny", "--synthetic", "40",
         "--image-size", "56", "--num-frames", "6", "--workers", "0", "--quiet"])
    return out


@pytest.fixture(scope="module")
def full_run(store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "full"
    run(train_cmd(store, out, "--max-steps", "16", "--save-every", "4", "--log-every", "2", "--val-every", "8",
                  "--keep", "2"))
    return out


@pytest.mark.slow  # train.py (and the store fixture's precompute.py) in new processes
def test_run_writes_every_tag_checkpoints_and_visuals(full_run):
    tags = scalars(full_run)
    assert set(tags) >= TRAIN_TAGS, TRAIN_TAGS - set(tags)
    assert set(tags) >= VAL_TAGS, VAL_TAGS - set(tags)
    assert set(tags["val/cap_ratio"]) == {8, 16}  # every --val-every steps and at the end
    assert {"val/attention_entropy/coarse", "val/token_cosine/fine_2"} <= set(tags)
    for step, ratio in tags["cap_ratio"].items():
        assert ratio == pytest.approx(tags["cap_coarse"][step] / tags["cap_fine"][step], rel=1e-5)
    acc = EventAccumulator(str(full_run), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert "val/attention/0" in acc.Tags()["images"]
    assert any("captions" in t for t in acc.Tags()["tensors"])
    assert sorted(p.name for p in full_run.glob("checkpoint_step*.pt")) == [
        "checkpoint_step00000012.pt", "checkpoint_step00000016.pt"]
    ckpt = torch.load(full_run / "checkpoint_latest.pt", weights_only=True)
    assert ckpt["step"] == 16 and ckpt["config"]["fine_iterations"] == 2
    assert ckpt["config"]["store"]["dino"] == "tiny" and ckpt["config"]["held_out"]["val_fraction"] == 0.25
    assert any(t.startswith("val/verdict") for t in acc.Tags()["tensors"])
    assert set(tags["nonfinite_steps"]) == {2, 4, 6, 8, 10, 12, 14, 16}  # once per log, not per skipped step
    losses = tags["loss"]
    assert all(np.isfinite(v) for v in losses.values())


@pytest.mark.slow  # train.py (and the store fixture's precompute.py) in new processes
def test_loss_decreases_on_the_tiny_preset(store, tmp_path):
    out = tmp_path / "learn"
    run(train_cmd(store, out, "--max-steps", "40", "--log-every", "10", "--val-every", "1000", "--lr", "3e-3",
                  "--warmup", "5", "--save-every", "1000", "--visual-videos", "0"))
    cap = scalars(out)["cap_fine"]
    assert cap[40] < 0.7 * cap[10], cap


@pytest.mark.slow  # train.py (and the store fixture's precompute.py) in new processes
def test_kill_9_and_rerun_continues_with_the_same_losses(store, full_run, tmp_path):
    out = tmp_path / "killed"
    cmd = train_cmd(store, out, "--max-steps", "16", "--save-every", "4", "--log-every", "2", "--val-every", "8",
                    "--keep", "2")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoint_step00000004.pt").exists():
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = torch.load(out / "checkpoint_latest.pt", weights_only=True)["step"]
    assert saved < 16, "the run ended before the kill"
    resumed = run(cmd)
    assert f"resumed from {out / 'checkpoint_latest.pt'} at step {saved}" in resumed.stderr
    want, got = scalars(full_run), scalars(out)
    for tag in ("loss", "cap_fine", "cap_coarse", "rec_fine", "val/cap_ratio"):
        for step, value in want[tag].items():
            if step > saved:
                assert got[tag][step] == pytest.approx(value, rel=1e-4, abs=1e-6), (tag, step)


@pytest.mark.slow  # train.py (and the store fixture's precompute.py) in new processes
def test_eval_only_prints_table_and_writes_json(store, full_run, tmp_path):
    # Only the store and the checkpoint: the preset, frames, fine iterations and split come from
    # the checkpoint (the run used --preset tiny --num-frames 4 --val-fraction 0.25).
    out_json = tmp_path / "eval.json"
    proc = run([sys.executable, str(ROOT / "train.py"), "--store", str(store), "--resume",
                str(full_run / "checkpoint_latest.pt"), "--eval-only", "--json", str(out_json), "--captions", "1",
                "--workers", "0"])
    assert f"wrote {out_json}" in proc.stderr
    result = json.loads(out_json.read_text())
    assert result["split"]["name"] == "held_out" and result["seen_in_training"] == 0
    assert isinstance(result["verdict"], str) and result["verdict"] in proc.stdout
    for key in ("cap_coarse", "cap_fine", "cap_ratio", "rec_coarse", "rec_fine", "num_videos"):
        assert key in result
    lo, hi = result["cap_ratio_ci"]
    assert lo <= result["cap_ratio"] <= hi
    lo, hi = result["shuffled_ratio_ci"]
    assert lo <= result["shuffled_ratio"] <= hi
    lo, hi = result["rec_ratio_ci"]
    assert lo <= result["rec_ratio"] <= hi and result["rec_ratio"] == result["rec_coarse"] / result["rec_fine"]
    # The control leaves out batches of one video (no other video's queries), so cap_fine over the
    # same videos differs a little from cap_fine over all of them.
    assert result["shuffled_ratio"] == pytest.approx(result["cap_fine_shuffled"] / result["cap_fine"], rel=2e-2)
    assert result["num_videos"] == len(FeatureDataset(str(store), 4, split="val", val_fraction=0.25)) > 0
    assert len(result["cap_passes"]) == 3  # the checkpoint's two fine iterations
    assert "cap_ratio" in proc.stdout and "shuffled_ratio" in proc.stdout
    assert "truth:" in proc.stdout and "autoregressive:" in proc.stdout


@pytest.mark.slow  # train.py (and the store fixture's precompute.py) in new processes
def test_refuses_a_checkpoint_of_another_model(store, full_run, tmp_path):
    proc = in_process(train_cmd(store, tmp_path / "x", "--resume", str(full_run / "checkpoint_latest.pt"),
                                "--fine-iterations", "1", "--max-steps", "20", "--recon-head", "delta"))
    one_line_error(proc, "trained with another model (fine_iterations: checkpoint 2, now 1; recon_head: checkpoint "
                         "'film', now 'delta')")


@pytest.mark.slow  # train.py (and the store fixture's precompute.py) in new processes
def test_reconstruction_only_with_a_head_that_is_not_given_the_last_frame(store, tmp_path):
    """--lambda-caption 0 --recon-head delta: the next-frame error falls, the captions are still scored, and
    the run's configuration and --eval-only's JSON (rec_ratio with its interval) say what was trained."""
    out = tmp_path / "recon"
    run(train_cmd(store, out, "--max-steps", "30", "--log-every", "10", "--val-every", "1000", "--lr", "3e-3",
                  "--warmup", "5", "--save-every", "1000", "--visual-videos", "0", "--fine-iterations", "1",
                  "--recon-head", "delta", "--lambda-caption", "0", "--lambda-recon", "1"))
    tags = scalars(out)
    assert tags["rec_fine"][30] < 0.9 * tags["rec_fine"][10], tags["rec_fine"]
    assert tags["loss"][30] == pytest.approx(tags["rec_fine"][30] + tags["rec_coarse"][30], rel=1e-5)
    assert np.isfinite(tags["cap_fine"][30])
    config = json.loads((out / "run_config.json").read_text())
    assert (config["recon_head"], config["lambda_caption"]) == ("delta", 0.0)
    report = tmp_path / "recon.json"
    run([sys.executable, str(ROOT / "train.py"), "--store", str(store), "--resume", str(out / "checkpoint_latest.pt"),
         "--eval-only", "--json", str(report), "--workers", "0", "--captions", "0"])
    result = json.loads(report.read_text())
    lo, hi = result["rec_ratio_ci"]
    assert lo <= result["rec_ratio"] <= hi and np.isfinite(result["cap_ratio"])


@pytest.mark.slow  # train.py (and the store fixture's precompute.py) in new processes
def test_resume_with_another_split_is_refused(store, full_run, tmp_path):
    """Resuming with another --val-fraction would train on held-out videos: refused, both values named."""
    run_dir = tmp_path / "resplit"
    shutil.copytree(full_run, run_dir)
    proc = in_process(train_cmd(store, run_dir, "--max-steps", "20", "--val-fraction", "0.1"))
    one_line_error(proc, "the held-out split differs from the checkpoint's: checkpoint val_fraction 0.25")
    assert "now 0.1" in proc.stderr


@pytest.mark.slow  # train.py (and the store fixture's precompute.py) in new processes
def test_eval_on_another_split_only_when_asked_and_labelled(store, full_run, tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), "--store", str(store), "--resume",
           str(full_run / "checkpoint_latest.pt"), "--eval-only", "--workers", "0", "--val-fraction", "1.0"]
    one_line_error(in_process(cmd), "add --other-split")
    out_json = tmp_path / "all.json"
    proc = run([*cmd, "--other-split", "--json", str(out_json)])
    result = json.loads(out_json.read_text())
    assert result["split"]["name"] == "other" and result["split"]["checkpoint_val_fraction"] == 0.25
    held_out = len(FeatureDataset(str(store), 4, split="val", val_fraction=0.25))
    assert result["num_videos"] == 40 and result["seen_in_training"] == 40 - held_out
    assert f"seen in training: {40 - held_out}" in proc.stdout


@pytest.mark.slow  # train.py (and the store fixture's precompute.py) in new processes
def test_eval_on_a_store_of_other_encoders_is_refused(store, full_run, tmp_path):
    other = tmp_path / "other.zarr"
    shutil.copytree(store, other)
    meta = json.loads((other / "zarr.json").read_text())
    meta["attributes"]["dino"] = "facebook/dinov2-small"
    (other / "zarr.json").write_text(json.dumps(meta))
    proc = in_process([sys.executable, str(ROOT / "train.py"), "--store", str(other), "--resume",
                       str(full_run / "checkpoint_latest.pt"), "--eval-only", "--workers", "0"])
    one_line_error(proc, "was made with other encoders or settings than the checkpoint's store (dino: checkpoint's "
                         "store 'tiny'")
    assert "'facebook/dinov2-small'" in proc.stderr and "--other-store" in proc.stderr


def one_line_error(proc: subprocess.CompletedProcess, text: str) -> None:
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert text in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if "%|" not in proc.stderr:  # before any training: the error alone (click usage errors add a usage line)
        assert len(lines) == 1 or lines[-1].startswith("Error:"), proc.stderr
    assert lines[-1].startswith("Error: ") and text in lines[-1], proc.stderr


@pytest.mark.slow  # train.py (and the store fixture's precompute.py) in new processes
def test_bad_input_is_a_one_line_error(store, tmp_path):
    one_line_error(run(train_cmd(tmp_path / "missing.zarr", tmp_path / "o"), check=False), "no store at")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {"format": "x"}}')
    one_line_error(in_process(train_cmd(foreign, tmp_path / "o")), "not an fvlm feature store")
    empty = tmp_path / "empty.zarr"
    StoreWriter.create_or_open(empty, dict(dino="tiny", vae="tiny", num_frames=6, image_size=56,
                                            feature_dtype="float16", dino_tokens=17, dino_dim=384,
                                            latent_shape=[4, 7, 7]),
                                FeatureShapes(6, {"dino": (17, 384), "latents": (4, 7, 7)}), capacity=2)
    one_line_error(in_process(train_cmd(empty, tmp_path / "o")), "no committed videos")
    one_line_error(in_process([*train_cmd(store, tmp_path / "o"), "--num-frames", "7"]), "stores 6 frames")
    proc = in_process([*train_cmd(store, tmp_path / "o"), "--preset", "huge"])
    assert proc.returncode != 0 and "huge" in proc.stderr and "Traceback" not in proc.stderr
    one_line_error(in_process([*train_cmd(store, tmp_path / "o"), "--lm", str(tmp_path / "no-such-lm")]),
                   "no such folder")
    one_line_error(in_process([*train_cmd(store, tmp_path / "o"), "--lambda-caption", "0", "--lambda-recon", "0"]),
                   "the loss would be 0")


@pytest.mark.slow  # train.py (and the store fixture's precompute.py) in new processes
def test_first_contact_errors(store, tmp_path):
    """What a new user meets first, through the real command line: one line, no traceback, saying
    what to do. (Text and random-byte checkpoints, --val-fraction 1.5 and a split with no training
    videos are checked in-process in tests/test_train_parts.py.)"""
    (tmp_path / "empty.pt").write_bytes(b"")
    one_line_error(in_process([*train_cmd(store, tmp_path / "o"), "--resume", str(tmp_path / "empty.pt")]),
                   "is empty (0 bytes)")
    # The default (hub) LM on a store made with the tiny preset, with no hub: fails with advice, without asking
    # the hub (why it is fast: tests/test_train_parts.py::test_hub_less_default_lm_asks_the_hub_at_most_once).
    cmd = [sys.executable, str(ROOT / "train.py"), "--store", str(store), "--out", str(tmp_path / "o"), "--workers",
           "0", "--num-frames", "4"]
    proc = run(cmd, check=False)
    one_line_error(proc, "cannot load language model 'HuggingFaceTB/SmolLM2-135M-Instruct'")
    assert "HF_HUB_OFFLINE" in proc.stderr and "--lm PATH" in proc.stderr and "add --preset tiny" in proc.stderr


@pytest.mark.slow  # the store fixture's precompute.py and the full run in new processes
def test_damaged_or_edited_checkpoints_are_one_line_on_resume_eval_and_load_trained(store, full_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(full_run, run_dir)  # checkpoint_latest.pt now a copy of step 16's, no longer the same file
    latest = run_dir / "checkpoint_latest.pt"
    data = bytearray(latest.read_bytes())
    data[len(data) // 2: len(data) // 2 + 8] = bytes(b ^ 0xFF for b in data[len(data) // 2: len(data) // 2 + 8])
    latest.write_bytes(data)
    proc = in_process(train_cmd(store, run_dir, "--max-steps", "20"))  # the same command again: it would resume
    one_line_error(proc, f"{latest} is damaged (bad CRC-32 of ")
    assert (f"{run_dir} holds the checkpoints of steps 12 (intact) and 16 (intact): give --resume "
            f"{run_dir / 'checkpoint_step00000016.pt'} to use the newest intact one") in proc.stderr
    raw = torch.load(full_run / "checkpoint_latest.pt", weights_only=True)
    name = next(iter(raw["model"]))
    raw["model"][name] = torch.zeros(3)
    torch.save(raw, tmp_path / "edited.pt")
    text = f"{tmp_path / 'edited.pt'}: its model's {name!r} has shape [3], the model's ["
    one_line_error(in_process(train_cmd(store, tmp_path / "o", "--resume", str(tmp_path / "edited.pt"), "--eval-only")),
                   text)
    with pytest.raises(TrainError, match=re.escape(text)):
        load_trained(str(store), tmp_path / "edited.pt")
    torch.save({**raw, "step": "16"}, tmp_path / "edited.pt")
    one_line_error(in_process(train_cmd(store, tmp_path / "o", "--resume", str(tmp_path / "edited.pt"))),
                   "its step is '16' (str), not a whole number >= 0")


@pytest.mark.slow  # train.py in new processes on a full disk
def test_a_full_disk_is_one_line_saying_what_the_run_folder_holds(store, tmp_path):
    """A save that fails leaves no temp file and says which checkpoints are intact; temp files of dead processes
    go on start; TensorBoard's writer on a full disk is one line too; with room again the run resumes."""
    disk = SmallDisk(tmp_path / "small", 12 * 2**20, ENV)  # room for one checkpoint of this model (8 MB), not two
    try:
        out = disk.folder / "run"
        cmd = train_cmd(store, out, "--max-steps", "4", "--save-every", "2", "--log-every", "2", "--val-every", "100",
                        "--visual-videos", "0")
        full = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=disk.env, timeout=600)
        one_line_error(full, f"cannot save the checkpoint of step 4 in {out}: No space left on device; {out} holds "
                             "the checkpoint of step 2 (intact). Free space and run the same command again: it "
                             "resumes from checkpoint_latest.pt (step 2)")
        assert sorted(p.name for p in out.glob(".*")) == [], "a temp file of the failed save is left"
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        stale = [out / f"..checkpoint_step00000004.pt.pending{dead.stdout.strip()}.tmp{dead.stdout.strip()}",
                 out / f".checkpoint_latest.tmp{dead.stdout.strip()}"]
        live = out / f".checkpoint_latest.tmp{os.getpid()}"  # a live process's (this one's): kept
        for path in (*stale, live):
            path.touch()
        disk.fill(rewritten=[out / "run_config.json"])
        events = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=disk.env, timeout=600)
        assert "Exception in thread" not in events.stderr, events.stderr
        one_line_error(events, f"{out}: No space left on device; {out} holds the checkpoint of step 2 (intact)")
        assert sorted(p.name for p in out.glob(".*")) == [live.name], events.stderr
        assert all(f"note: removed {p.name}, left by an interrupted checkpoint save" in events.stderr for p in stale)
        disk.make_room()
        live.unlink()
        resumed = in_process(cmd)
        assert resumed.returncode == 0 and f"resumed from {out / 'checkpoint_latest.pt'} at step 2" in resumed.stderr
        assert torch.load(out / "checkpoint_latest.pt", weights_only=True)["step"] == 4
    finally:
        disk.close()


@pytest.mark.slow  # train.py (and the store fixture's precompute.py) in new processes
def test_every_option_has_help_and_workers_fit_the_machine():
    help_text = run([sys.executable, str(ROOT / "train.py"), "--help"]).stdout
    entries = re.split(r"\n  (?=-)", help_text.split("Options:")[1])[1:]
    assert len(entries) > 30
    for entry in entries:
        flags, _, text = entry.strip().partition("  ")
        assert text.strip(), f"no help text: {flags}"
    cores = len(os.sched_getaffinity(0))
    # The cores this process may use, shared by the ranks on this machine (one here), one left to the loop.
    assert f"[default: {max(0, min(16, cores - 1))};" in help_text.split("--workers")[1].split("--")[0]


@pytest.mark.slow  # train.py (and the store fixture's precompute.py) in new processes
def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path):
    """NaN features make every loss NaN: steps are skipped and counted, then the run stops cleanly."""
    path = tmp_path / "nan.zarr"
    shapes = FeatureShapes(4, {"dino": (17, 384), "latents": (4, 7, 7)})
    store = StoreWriter.create_or_open(path, dict(dino="tiny", vae="tiny", num_frames=4, image_size=56,
                                                   feature_dtype="float16", dino_tokens=17, dino_dim=384,
                                                   latent_shape=[4, 7, 7]), shapes, capacity=12)
    for i in range(12):
        write_row(store, i, dino=np.full((4, 17, 384), np.nan, np.float16), latents=np.zeros((4, 4, 7, 7)),
                  caption="a red circle", video_id=f"v{i}", source="s", timestamps=np.arange(4), duration=4)
    proc = run(train_cmd(path, tmp_path / "run", "--max-steps", "50", "--max-nonfinite", "3", "--log-every", "1",
                         "--val-fraction", "0.0"), check=False)
    one_line_error(proc, "3 non-finite steps in a row")
    tags = scalars(tmp_path / "run")
    assert tags["nonfinite_steps"] == {1: 1, 2: 2, 3: 3}  # once per step, never twice
    assert "loss" not in tags and "cap_fine" not in tags  # no step was taken: no loss is logged (never a 0)
    assert not (tmp_path / "run" / "checkpoint_latest.pt").exists()  # no NaN weights were ever saved


@pytest.mark.slow  # train.py (and the store fixture's precompute.py) in new processes
def test_torchrun_two_cpu_processes_default_grad_accum(store, tmp_path):
    """Two gloo processes with the default --grad-accum 2 (DDP's no_sync on the first micro-batch), caption loss
    only (--lambda-recon 0: the next-frame head gets no gradient, which DDP must be told or its second step fails)."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    out = tmp_path / "ddp"
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", *train_cmd(store, out, grad_accum=None)[1:],
           "--max-steps", "6", "--save-every", "3", "--log-every", "3", "--val-every", "6", "--visual-videos", "0",
           "--lambda-recon", "0"]
    run(cmd)
    assert (out / "checkpoint_latest.pt").exists()
    assert len(list(out.glob("events.out.tfevents.*"))) >= 1
    tags = scalars(out)
    assert set(tags["loss"]) == {3, 6}  # logged once per step, by rank 0 only
    ckpt = torch.load(out / "checkpoint_latest.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["config"]["grad_accum"] == 2
    # 31 training videos: 15 per rank, 3 micro-batches of 4 per epoch; 6 steps x 2 = 12 micro-batches.
    assert (ckpt["epoch"], ckpt["micro_in_epoch"]) == (3, 3) and all(np.isfinite(v) for v in tags["loss"].values())


def test_schedule_and_ratio_arithmetic():
    assert lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(55, 1.0, 10, 100) == pytest.approx(0.55)
    m = pass_metrics([11.0, 10.0], 10, [0.4, 0.5], 2, ModelConfig())
    assert m["cap_ratio"] == pytest.approx(1.1) and m["cap_improvement_pct"] == pytest.approx(10.0)
    assert m["rec_ratio"] == pytest.approx(0.8) and m["cap_fine"] == pytest.approx(1.0)
    assert m["loss"] == pytest.approx((1.0 + 0.1 * 0.25) + (1.1 + 0.1 * 0.2))


@pytest.mark.slow  # a real training run (in this process) and --eval-only
def test_eval_counts_seen_in_training_by_file_not_by_row(tmp_path):
    """Ten files of three rows each (one per caption, each with its own video id): the split by file
    keeps every held-out file out of training, and --eval-only says so (0 seen), counting files."""
    from fvlm_data.dataset import validation_mask
    from fvlm_data.precompute.pipeline import input_keys
    from fvlm_data.records import VideoInput

    items = [VideoInput(video_id=f"clip{k}-{j}", source=f"/v/clip{k}.mp4", caption=f"caption {j} of clip {k}",
                        file_id=f"clip{k}") for k in range(10) for j in range(3)]
    held_out = validation_mask([it.file_id for it in items], 0.25)
    assert held_out.any() and not validation_mask([it.video_id for it in items], 0.25)[held_out].all()
    path = tmp_path / "rows.zarr"
    shapes = FeatureShapes(4, {"dino": (17, 384), "latents": (4, 7, 7)})
    store = StoreWriter.create_or_open(path, dict(dino="tiny", vae="tiny", num_frames=4, image_size=56,
                                                   feature_dtype="float16", dino_tokens=17, dino_dim=384,
                                                   latent_shape=[4, 7, 7]), shapes, capacity=len(items),
                                       inputs=input_keys(items, PrecomputeConfig(out=str(path))))
    rng = np.random.default_rng(0)
    for i, it in enumerate(items):
        write_row(store, i, dino=rng.standard_normal((4, 17, 384)), latents=rng.standard_normal((4, 4, 7, 7)),
                  caption=it.caption, video_id=it.video_id, source=it.source, file_id=it.file_id,
                  timestamps=np.arange(4), duration=4)
    out = tmp_path / "run"
    proc = in_process(train_cmd(path, out, "--max-steps", "1", "--visual-videos", "0"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = tmp_path / "eval.json"
    proc = in_process([*train_cmd(path, out, "--resume", str(out / "checkpoint_latest.pt"), "--eval-only",
                                  "--json", str(report))])
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(report.read_text())
    assert result["num_videos"] == held_out.sum() and result["num_files"] == held_out.sum() // 3
    assert result["seen_in_training"] == 0 and result["files_seen_in_training"] == 0
    assert f"{held_out.sum()} from {held_out.sum() // 3} files, of which seen in training: 0 videos" in proc.stdout
