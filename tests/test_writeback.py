"""Features converted on the device give the bytes the host conversion gives; the writer thread's
failures reach the caller."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fvlm_data.precompute.writeback import BackgroundWriter, DeviceTransfers, quantize_int8, stored_features
from fvlm_data.store.format import quantize_int8 as quantize_int8_numpy


def _features(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 5, 257, 384), dtype=np.float32) * rng.lognormal(0, 2, (3, 5, 257, 1)).astype(np.float32)
    x[0, 0, 0] = 0.0  # an all-zero token: the scale floor
    x[0, 0, 1, :7] = [65504.0, 70000.0, -1e-8, 6e-8, 2.5, -2.5, 127.5]  # fp16 overflow, subnormals, ties
    x[1, 1, 2] = np.float32(1e-6) * np.arange(384, dtype=np.float32)  # tiny values: scale at the floor
    return x


@pytest.mark.parametrize("seed", [0, 1])
def test_int8_on_the_device_gives_the_bytes_of_the_store_rule(seed):
    x = _features(seed)
    want_q, want_scale = quantize_int8_numpy(x)
    q, scale = quantize_int8(torch.from_numpy(x))
    assert q.dtype == torch.int8 and scale.dtype == torch.float16
    assert q.numpy().tobytes() == want_q.tobytes()
    assert scale.numpy().tobytes() == want_scale.tobytes()
    # From bfloat16 (the CUDA compute dtype) too: the same as quantizing its float32 value.
    xb = torch.from_numpy(x).bfloat16()
    q, scale = quantize_int8(xb)
    want_q, want_scale = quantize_int8_numpy(xb.float().numpy())
    assert q.numpy().tobytes() == want_q.tobytes() and scale.numpy().tobytes() == want_scale.tobytes()


def test_float16_on_the_device_equals_numpys_cast():
    x = _features(2)
    for src in (torch.from_numpy(x), torch.from_numpy(x).bfloat16()):
        got = stored_features({"dino": src, "latents": src[..., :16]}, "float16")
        with np.errstate(over="ignore"):
            want = src.float().numpy().astype(np.float16)
        assert got["dino"].numpy().tobytes() == want.tobytes()
        assert got["latents"].numpy().tobytes() == want[..., :16].tobytes()
        assert "dino_scale" not in got
    got = stored_features({"dino": torch.from_numpy(x), "latents": torch.from_numpy(x[..., :4])}, "int8")
    assert got["dino"].dtype == torch.int8 and got["dino_scale"].shape == x.shape[:-1]


def test_host_copy_on_the_cpu_is_the_tensor():
    t = torch.arange(6, dtype=torch.float16)
    copy = DeviceTransfers(torch.device("cpu")).to_host({"dino": t})
    np.testing.assert_array_equal(copy.arrays()["dino"], t.numpy())
    copy.release()


def test_writer_runs_jobs_in_order_and_raises_a_failure_on_the_callers_thread():
    done: list[int] = []
    writer = BackgroundWriter(max_waiting=1)
    for i in range(5):
        writer.submit(done.append, i)
    writer.close()
    assert done == [0, 1, 2, 3, 4]

    def fail() -> None:
        raise OSError(28, "No space left on device")

    writer = BackgroundWriter(max_waiting=1)
    writer.submit(fail)
    with pytest.raises(OSError, match="No space left"):
        for i in range(100):  # a later hand-over sees it (or close does)
            writer.submit(done.append, 10 + i)
        writer.close()
    assert 10 + 99 not in done  # jobs after the failure were dropped, not run
    writer.abandon()


def test_int8_store_from_precompute_holds_the_host_rules_bytes(tmp_path):
    """run_precompute (writer thread, int8 quantized on the device) stores what the numpy rule gives
    for the same encoder outputs, batch for batch."""
    from fvlm_data.precompute.config import PrecomputeConfig
    from fvlm_data.precompute.encoders import FrozenEncoders
    from fvlm_data.precompute.pipeline import run_precompute
    from fvlm_data.sources import list_inputs, load_frames
    from fvlm_data.store import FeatureStore

    config = PrecomputeConfig(out=str(tmp_path / "q.zarr"), preset="tiny", synthetic=4, num_frames=3, image_size=56,
                              feature_dtype="int8", workers=0, batch_videos=2, shard_videos=3, quiet=True)
    inputs = list_inputs(synthetic=4)
    encoders = FrozenEncoders("tiny", "tiny")
    summary = run_precompute(config, inputs, encoders, progress=False)
    assert summary.written == 4
    store = FeatureStore.open(config.out)
    for lo in (0, 2):
        frames = np.concatenate([load_frames(item, 3, 56).frames for item in inputs[lo : lo + 2]])
        out = encoders.encode(torch.from_numpy(frames))
        q, scale = quantize_int8_numpy(out["dino"].numpy())
        latents = out["latents"].numpy().astype(np.float16)
        for k in range(2):
            row = store.read(lo + k)
            assert row["dino"].dtype == np.int8
            assert row["dino"].tobytes() == q[3 * k : 3 * k + 3].tobytes()
            assert row["dino_scale"].tobytes() == scale[3 * k : 3 * k + 3].tobytes()
            assert row["latents"].tobytes() == latents[3 * k : 3 * k + 3].tobytes()


def test_compile_is_on_for_cuda_and_off_on_the_cpu_unless_asked():
    import click

    from fvlm_data.precompute.config import PrecomputeConfig, click_options

    got = []

    @click.command()
    @click_options
    def cli(**args):
        got.append(PrecomputeConfig(**args))

    for argv in ([], ["--compile"], ["--no-compile"]):
        cli(["--out", "s.zarr", *argv], standalone_mode=False)
    default, on, off = got
    assert (default.compile_on("cuda:0"), default.compile_on("cpu")) == (True, False)
    assert (on.compile_on("cpu"), off.compile_on("cuda")) == (True, False)
    assert "compile" not in default.recorded()  # speed only: not part of how the store was made
