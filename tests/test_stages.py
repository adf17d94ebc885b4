"""A precompute says what bounded it: each stage's busy share and one line of advice (precompute/stages.py)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from fvlm_data.precompute.config import PrecomputeConfig
from fvlm_data.precompute.encoders import FrozenEncoders
from fvlm_data.precompute.pipeline import PrecomputeSummary, run_precompute
from fvlm_data.precompute.stages import StageTimes
from fvlm_data.sources import list_inputs
from tests.helpers.clips import write_clip


@pytest.mark.parametrize("times, bound, advice", [
    (dict(workers=2, decode_s=19.6, encode_s=4.1, write_s=2.0), "decode",
     "decode workers busy 98%, encoders 41%: decoding bounded this run; add --workers"),
    (dict(workers=0, decode_s=9.0, encode_s=0.5, write_s=0.2, seek="keyframe"), "decode",
     "decoding (in this process) busy 90%, encoders 5%: decoding bounded this run; add --workers"),
    (dict(workers=8, decode_s=40.0, encode_s=9.5, write_s=3.0), "encoders",
     "encoders busy 95%, decode workers 50%, writer 30%: the encoders bounded this run"),
    (dict(workers=8, decode_s=8.0, encode_s=3.0, write_s=9.7, wait_writer_s=6.0), "writer",
     "writer busy 97%, encoders 30%: writing the store bounded this run"),
    (dict(workers=1, decode_s=2.0, encode_s=3.0, write_s=1.0), None, "no stage was busy half the run"),
])
def test_the_busiest_stage_is_named_with_what_to_change(times, bound, advice):
    stages = StageTimes(wall_s=10.0, **times)
    assert stages.bound() == bound
    assert stages.advice().startswith(advice)
    assert ("use --seek keyframe" in stages.advice()) == (bound == "decode" and stages.seek == "exact")
    # Ranks' summaries merge into one: shares averaged over the processes.
    merged = PrecomputeSummary.merge([PrecomputeSummary(written=1, stages=stages)] * 2)
    assert merged.stages.bound() == bound and merged.stages.shares() == pytest.approx(stages.shares())
    assert merged.lines("x")[-2].startswith("stages (over 2 processes): ")


@pytest.mark.slow
def test_a_run_whose_decoding_is_slow_says_so(tmp_path):
    """Real clips that decode slowly (480x270, one keyframe in 6 s: exact seeking decodes every frame up to
    each target) and tiny encoders on 2 frames of 28 px, on one thread (torch's spinning threads make them
    erratic on a loaded machine): decoding is far the slowest stage. The store is on a memory file system
    where there is one, so that a loaded disk cannot make the writer the slowest."""
    videos = tmp_path / "videos"
    videos.mkdir()
    write_clip(videos / "v0.mp4", seconds=6, width=480, height=270, fps=25, gop_seconds=10)
    for i in range(24):
        if i:
            os.link(videos / "v0.mp4", videos / f"v{i}.mp4")
        (videos / f"v{i}.txt").write_text("a caption")
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else tmp_path) as where:
        config = PrecomputeConfig(out=str(Path(where) / "s.zarr"), preset="tiny", num_frames=2, image_size=28,
                                  workers=0, batch_videos=8, shard_videos=24, quiet=True)
        encoders = FrozenEncoders(dino=config.dino_id, vae=config.vae_id, device="cpu", compile=False)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            summary = run_precompute(config, list_inputs(videos=str(videos)), encoders, progress=False)
        finally:
            torch.set_num_threads(threads)
    assert summary.written == 24
    lines = summary.lines(config.out)
    assert lines[-2].startswith("stages: decoding here busy ")
    assert summary.stages.bound() == "decode", lines[-2]
    assert "decoding bounded this run; add --workers or use --seek keyframe" in lines[-1]
