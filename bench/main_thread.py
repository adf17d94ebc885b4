"""The precompute main thread's own work per encode batch, with the encoders replaced by a stand-in.

    python -m bench.precompute_speed --part pipeline                  # 8 videos x 24 frames, real shapes
    python -m bench.precompute_speed --part pipeline --pipeline-videos 16 --rounds 1   # quicker

The stand-in encoder is a device-side no-op of the real output shapes (DINO [B*T, N, D], latents
[B*T, 4, 32, 32], preallocated, in the CUDA compute dtype's place fp32 on the CPU) that sleeps
--gpu-ms per batch, as a GPU encode would keep the main thread waiting without using its core
(360 ms: 8 x 24 frames at the reference's H200 rates). `run_precompute` itself runs around it,
on decoded videos held in memory (decode workers are other processes), into a real store on disk.
Measured per batch (mean over a round, median over rounds): the main thread's time outside the
encoders by its own CPU clock (`time.thread_time`: waits and the other threads do not count) and by
the wall clock less its waits for a full writer queue, and of the CPU time the conversion to the
stored dtypes (`stored_features`: a device kernel on CUDA, CPU work here), against the target of
36 ms. `today` runs the loop as it was before the writer thread (encode, fp32 to the host,
`add_row`, `publish`, all on the main thread), rounds interleaved with the new one. The wall time
per batch of the writer's two threads (adding rows, less waits for the publisher; publishing shards)
says whether they keep up with the GPU (at most --gpu-ms each); they run side by side. After each round
the writer runs alone on the same rows, then the objects it wrote are written again as plain files
(one write + fsync each, on the same disk): its own cost against the disk's.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from fvlm_data.precompute import pipeline
from fvlm_data.precompute.config import PrecomputeConfig
from fvlm_data.records import DecodedVideo, VideoInput
from fvlm_data.store import FeatureShapes, ShardBuffer
from fvlm_data.store.writer import StoreWriter


class NoOpEncoders:
    """FrozenEncoders' interface: `encode` returns preallocated outputs after `gpu_s` of waiting."""

    dino_id = vae_id = "bench-noop"
    compiled = False
    vae_scaling_factor = 1.0
    dino_blocks: tuple[int, ...] = ()  # no --dino-layers states
    dino_fingerprint = None

    def __init__(self, frames: int, tokens: int, dim: int, gpu_s: float) -> None:
        self.device = torch.device("cpu")
        self.shapes = {"dino": (tokens, dim), "latents": (4, 32, 32)}
        gen = torch.Generator().manual_seed(0)
        self._dino = torch.randn(frames, tokens, dim, generator=gen)
        self._latents = torch.randn(frames, 4, 32, 32, generator=gen)
        self.gpu_s = gpu_s
        self.calls: list[tuple[float, float, float, float]] = []  # (wall, CPU) at each call's start, then end

    def output_shapes(self, image_size: int) -> dict:
        return self.shapes

    def describe(self) -> dict:
        return {"dino": self.dino_id, "vae": self.vae_id, "vae_scaling_factor": 1.0}

    def encode(self, frames: torch.Tensor, *, float32: bool = True) -> dict[str, torch.Tensor]:
        w0, c0 = time.perf_counter(), time.thread_time()
        time.sleep(self.gpu_s)  # the GPU's time; the main thread only waits
        n = len(frames)
        self.calls.append((w0, c0, time.perf_counter(), time.thread_time()))
        return {"dino": self._dino[:n], "latents": self._latents[:n]}


class _Clock:
    """Wall and CPU time spent inside wrapped functions: (name, thread, wall start, wall s, CPU s) each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float, float, float]] = []

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            w0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.calls.append((name, threading.current_thread().name, w0, time.perf_counter() - w0,
                                   time.thread_time() - c0))
        return timed

    def total(self, name: str, thread: str, wall: bool) -> float:
        return sum(c[3] if wall else c[4] for c in self.calls if c[0] == name and c[1] == thread)

    def within(self, name: str, lo: float, hi: float, thread: str) -> float:
        """Wall seconds of `name`'s calls on `thread` that started in [lo, hi)."""
        return sum(c[3] for c in self.calls if c[0] == name and c[1] == thread and lo <= c[2] < hi)


def _videos(n: int, frames: int, size: int) -> list[tuple[int, VideoInput, DecodedVideo]]:
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8) for _ in range(4)]
    stamps = (np.arange(frames) + 0.5) * 1.5
    return [(i, VideoInput(f"v{i:05d}", "bench", "a caption of a few words"),
             DecodedVideo(pixels[i % 4], stamps, 36.0)) for i in range(n)]


def _between_encodes(encoders: NoOpEncoders, clock: _Clock | None) -> dict:
    """The main thread between one encode's end and the next one's start: CPU, and wall less the
    waits for a full writer queue (with a GPU those waits would be the writer falling behind)."""
    calls = encoders.calls
    pairs = list(zip(calls, calls[1:], strict=False))
    cpu = [nxt[1] - cur[3] for cur, nxt in pairs]
    waits = [clock.within("submit", cur[2], nxt[0], "MainThread") if clock else 0.0 for cur, nxt in pairs]
    wall = [nxt[0] - cur[2] - w for (cur, nxt), w in zip(pairs, waits, strict=True)]
    # Means, not medians: a shard is published once every 8 batches and its cost counts per batch.
    return {"main_ms": 1e3 * statistics.mean(cpu), "main_max_ms": 1e3 * max(cpu),
            "main_wall_ms": 1e3 * statistics.mean(wall), "wait_ms": 1e3 * statistics.mean(waits),
            "per_batch_ms": [round(1e3 * x, 1) for x in cpu],
            "encoder_ms": 1e3 * statistics.median(c[2] - c[0] for c in calls)}


def _new_round(out: Path, args, decoded: list) -> dict:
    """`run_precompute` around the stand-in: main-thread ms per batch outside the encoders."""
    frames = args.videos * args.frames_per_video
    encoders = NoOpEncoders(frames, args.dino_tokens, 384, args.gpu_ms / 1e3)
    config = PrecomputeConfig(out=str(out), preset="tiny", num_frames=args.frames_per_video, image_size=256,
                              workers=0, batch_videos=args.videos, quiet=True, shard_videos=64)
    clock = _Clock()
    shards, writer = pipeline._ShardsInProgress, pipeline.BackgroundWriter
    saved = (pipeline.decoded_in_order, pipeline.stored_features, shards.add_rows, writer.submit,
             ShardBuffer.publish, writer.close)
    pipeline.decoded_in_order = lambda executor, items, window, decoding, stages=None: iter(decoded)
    pipeline.stored_features = clock.wrap("convert", saved[1])
    shards.add_rows = clock.wrap("add_rows", saved[2])
    writer.submit = clock.wrap("submit", saved[3])
    ShardBuffer.publish = clock.wrap("publish", saved[4])
    writer.close = clock.wrap("close", saved[5])
    try:
        t0 = time.perf_counter()
        pipeline.run_precompute(config, [item for _, item, _ in decoded], encoders, progress=False)
        wall = time.perf_counter() - t0
    finally:
        (pipeline.decoded_in_order, pipeline.stored_features, shards.add_rows, writer.submit,
         ShardBuffer.publish, writer.close) = saved
    batches = len(encoders.calls)
    # The writer's two threads: rows added (less waits for the publisher thread), shards published.
    rows = clock.total("add_rows", "store-writer", wall=True) - clock.total("submit", "store-writer", wall=True)
    return {**_between_encodes(encoders, clock),
            "convert_ms": 1e3 * clock.total("convert", "MainThread", wall=False) / batches,
            "rows_ms": 1e3 * rows / batches,
            "writer_ms": 1e3 * clock.total("publish", "store-publisher", wall=True) / batches,
            "wall_ms": 1e3 * wall / batches,
            "drain_s": clock.total("close", "MainThread", wall=True)}


def _writer_alone(out: Path, args, decoded: list) -> dict:
    """The writer by itself (no pipeline around it) on the round's rows, `add_row` and `publish` shard by
    shard, each shard side by side with a plain write + fsync of the same objects' bytes on the same disk
    (in alternating order), per batch. The first shard is left out: its buffers are fresh (a page fault
    per 4 kB), paid once per run, then reused."""
    t = args.frames_per_video
    shapes = FeatureShapes(t, {"dino": (args.dino_tokens, 384), "latents": (4, 32, 32)})
    attrs = dict(dino="bench", vae="bench", num_frames=t, image_size=256, feature_dtype="float16")
    store = StoreWriter.create_or_open(out, attrs, shapes, capacity=len(decoded), shard_videos=64)
    gen = torch.Generator().manual_seed(0)
    dino = torch.randn(args.videos, t, args.dino_tokens, 384, generator=gen).half().numpy()
    latents = torch.randn(args.videos, t, 4, 32, 32, generator=gen).half().numpy()

    def write(shard: int) -> float:
        t0 = time.perf_counter()
        buf = store.shard_buffer(shard)
        for slot, item, video in decoded[buf.start : buf.stop]:
            k = slot % args.videos
            buf.add_row(slot, dino=dino[k], latents=latents[k], caption=item.caption, video_id=item.video_id,
                        source=item.source, timestamps=video.timestamps, duration=video.duration)
        buf.publish()
        return time.perf_counter() - t0

    def plain(shard: int) -> float:  # the objects of `shard` (written before), as plain files
        return _plain_write(out, Path(str(out) + ".plain"), lambda key: key.split("/")[2] == str(shard))

    write(0)
    pairs = []  # (writer s, plain s) per full shard
    for shard in range(1, len(decoded) // 64):
        if shard % 2:
            pairs.append((write(shard), plain(shard)))
        else:  # plain first: the previous shard's bytes, the same sizes
            p = plain(shard - 1)
            pairs.append((write(shard), p))
    shutil.rmtree(Path(str(out) + ".plain"), ignore_errors=True)
    per_batch = 64 / args.videos
    return {"pairs_ms": [(1e3 * w / per_batch, 1e3 * p / per_batch) for w, p in pairs]}


def _plain_write(store: Path, into: Path, wanted) -> float:
    """Seconds to write the store's shard objects (those whose key is `wanted`) again as new plain files
    under `into`, one after the other, each one write + fsync (their bytes read into memory first,
    untimed). The files are kept, as the store's are: freeing their page cache would make the next
    writes cheaper than the store's own."""
    objects = [f.read_bytes() for f in sorted(store.rglob("*"))
               if f.is_file() and "/c/" in f.as_posix() and wanted(f.relative_to(store).as_posix())]
    into.mkdir(parents=True, exist_ok=True)
    first = len(list(into.iterdir()))
    t0 = time.perf_counter()
    for i, data in enumerate(objects):
        with open(into / str(first + i), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return time.perf_counter() - t0


def _today_round(out: Path, args, decoded: list) -> dict:
    """The loop as it was: encode, fp32 to the host, add_row and publish on the main thread."""
    frames, t = args.videos * args.frames_per_video, args.frames_per_video
    encoders = NoOpEncoders(frames, args.dino_tokens, 384, args.gpu_ms / 1e3)
    shapes = FeatureShapes(t, {"dino": (args.dino_tokens, 384), "latents": (4, 32, 32)})
    attrs = dict(dino="bench", vae="bench", num_frames=t, image_size=256, feature_dtype="float16")
    store = StoreWriter.create_or_open(out, attrs, shapes, capacity=len(decoded), shard_videos=64)
    buffers: dict[int, ShardBuffer] = {}
    t0 = time.perf_counter()
    for i in range(0, len(decoded), args.videos):
        batch = decoded[i : i + args.videos]
        encoded = encoders.encode(torch.from_numpy(np.concatenate([v.frames for _, _, v in batch])))
        dino = encoded["dino"].view(len(batch), t, *encoded["dino"].shape[1:]).cpu().numpy()
        latents = encoded["latents"].view(len(batch), t, *encoded["latents"].shape[1:]).cpu().numpy()
        for k, (slot, item, video) in enumerate(batch):
            shard = slot // 64
            buf = buffers.setdefault(shard, store.shard_buffer(shard))
            buf.add_row(slot, dino=dino[k], latents=latents[k], caption=item.caption, video_id=item.video_id,
                        source=item.source, timestamps=video.timestamps, duration=video.duration)
            if buf.complete():
                buffers.pop(shard).publish()
    wall = time.perf_counter() - t0
    return {**_between_encodes(encoders, None), "convert_ms": 0.0, "rows_ms": 0.0, "writer_ms": 0.0,
            "wall_ms": 1e3 * wall / len(encoders.calls), "drain_s": 0.0}


def pipeline_rows(args, rows: list[dict], emit) -> None:
    decoded = _videos(args.pipeline_videos, args.frames_per_video, 256)
    got: dict[str, list[dict]] = {"today": [], "writer thread": []}
    alone = []
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fvlm_pipeline_", dir=args.workdir) as tmp:
        for r in range(args.rounds):
            order = [("today", _today_round), ("writer thread", _new_round)]
            for name, fn in order if r % 2 == 0 else order[::-1]:  # interleaved, alternating order
                got[name].append(fn(Path(tmp) / f"{name.split()[0]}{r}.zarr", args, decoded))
            alone.append(_writer_alone(Path(tmp) / f"alone{r}.zarr", args, decoded))
    pairs = [pair for r in alone for pair in r["pairs_ms"]]  # (writer alone, plain write) ms per batch
    for name, runs in got.items():
        row = {"part": "pipeline", "variant": name, "rounds": len(runs),
               **{k: statistics.median(run[k] for run in runs) for k in runs[0] if k != "per_batch_ms"},
               "per_batch_ms": [run["per_batch_ms"] for run in runs]}
        if name == "writer thread" and pairs:
            row["alone_vs_plain_ms"] = pairs
        print(f"# {name}: main thread ms outside the encoders, batch by batch, round by round: "
              f"{row['per_batch_ms']}", flush=True)
        rows.append(row)
        emit(row)
    today, new = rows[-2], rows[-1]
    print(f"main thread outside the encoders per batch: CPU {new['main_ms']:.1f} ms, wall less waits "
          f"{new['main_wall_ms']:.1f} ms (target 36 ms); today CPU {today['main_ms']:.1f} ms, wall "
          f"{today['main_wall_ms']:.1f} ms: {new['main_wall_ms'] / today['main_wall_ms']:.3f}x of today's wall; "
          f"the writer thread {new['rows_ms']:.0f} ms and the publisher thread {new['writer_ms']:.0f} ms per batch "
          f"against the encoder's {new['encoder_ms']:.0f}",
          flush=True)
    if not pairs:
        return
    a, p = statistics.median(w for w, _ in pairs), statistics.median(p for _, p in pairs)
    ratios = [w / p for w, p in pairs]
    print(f"the writer alone (add_row + publish) {a:.0f} ms per batch, a plain write + fsync of the same bytes on the "
          f"same disk {p:.0f} ms, shard by shard side by side (medians of {len(pairs)} shards): {a / p:.2f}x (ratios "
          f"{', '.join(f'{x:.2f}' for x in ratios)}; median {statistics.median(ratios):.2f}x); in the pipeline the "
          f"main loop waits {new['wait_ms']:.1f} ms per batch for the writer, and {new['drain_s']:.1f} s at the end "
          "for the last shards' writes", flush=True)


PIPE_HEADER = ("| main loop | rounds | encoder ms/batch (stand-in) | main thread CPU ms/batch outside the encoders "
               "(mean) | max | main thread wall ms/batch outside the encoders, less waits for the writer | of the "
               "CPU: dtype conversion | waits for the writer ms/batch | writer thread (rows added) wall ms/batch | "
               "publisher thread (shards written) wall ms/batch | wall ms/batch |\n"
               "|---|---|---|---|---|---|---|---|---|---|---|")


def fmt_pipe(r: dict) -> str:
    return (f"| {r['variant']} | {r['rounds']} | {r['encoder_ms']:.0f} | {r['main_ms']:.1f} | {r['main_max_ms']:.1f} | "
            f"{r['main_wall_ms']:.1f} | {r['convert_ms']:.1f} | {r['wait_ms']:.1f} | {r['rows_ms']:.0f} | "
            f"{r['writer_ms']:.0f} | {r['wall_ms']:.0f} |")
