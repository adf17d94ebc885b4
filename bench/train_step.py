"""Benchmark one full training step (forward + backward + clip + AdamW) of FoveatedVLM.

    python -m bench.train_step                                    # SmolLM2-135M shape, the seed's settings, GPU
    python -m bench.train_step --variants eager,compiled,compiled-cg --batch-size 64
    python -m bench.train_step --lm tiny --device cpu --batch-size 4 --frames 8 --tokens 65 --caption-tokens 16
    python -m bench.train_step --lm tiny --device cpu --variants eager --recon-head delta --lambda-recon 0.1

The LM is random-initialised from its config (no network): `smollm2` is SmolLM2-135M's shape
(width 576, 30 layers, 9 heads, 3 KV heads, vocab 49152, tied embeddings), `tiny` the 2-layer test
preset. Inputs are synthetic tensors of the given shape, already on the device (data loading is
not timed). The step is the trainer's own `fvlm_train.step.train_step` with the trainer's optimiser
(`fvlm_train.step.make_optimizer`): fp32 weights, bf16 autocast on CUDA (fp32 on CPU), backward,
gradient clipping at 1.0, fused AdamW (a non-finite step skipped on the device).

Variants (comma-separated --variants):
  eager          the plain module
  compiled       torch.compile(model)                                (inductor, default mode)
  compiled-cg    torch.compile(model, mode="reduce-overhead")        (+ CUDA graphs, CUDA only)
  compiled-max   torch.compile(model, mode="max-autotune-no-cudagraphs")
  compiled-max-cg torch.compile(model, mode="max-autotune")          (CUDA only)

Prints, per variant: samples/s (batch / median step time after --warmup steps), the first step's
time (compilation included), the host reads of one more step run as the training loop runs a step it
does not log (`.item()`, `.tolist()`, `.cpu()`, `float()`, ... of a tensor, counted by
`fvlm_train.step`; target 0), peak memory (CUDA: max_memory_allocated; CPU: the process's peak
RSS so far), FLOPs per sample (FlopCounterMode over one eager forward+backward, / batch; printed
before the table also with the intermediate fine passes fed the caption, as before they ran without it) and the
achieved fraction of the chip's dense bf16 matrix rate ('n/a' on CPU or an unknown GPU). With
--json the rows are also written as JSON (gpu.sh collects them into one table).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.common import LATENT, peak_flops, random_init_model, sync
from fvlm_model import RECON_HEADS
from fvlm_model.lm import use_causal_sdpa
from fvlm_train.progress import peak_memory_gb
from fvlm_train.step import count_host_reads, make_optimizer, random_batch, train_step

VARIANTS = {
    "eager": None,
    "compiled": {},
    "compiled-cg": {"mode": "reduce-overhead"},
    "compiled-max": {"mode": "max-autotune-no-cudagraphs"},
    "compiled-max-cg": {"mode": "max-autotune"},
}


# ----------------------------------------------------------------------------- data, step
def synthetic_batch(model: torch.nn.Module, batch: int, frames: int, tokens: int, dim: int, caption_tokens: int,
                    device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random features of the store's shapes (latents: SD-VAE's of 256 px frames) and captions of
    random lengths, on the device."""
    vocab = model.lm.get_input_embeddings().weight.shape[0]
    return {k: v.to(device) for k, v in random_batch(vocab, batch, frames, tokens, dim, LATENT, caption_tokens,
                                                     seed).items()}


def wrap(model: torch.nn.Module, variant: str) -> torch.nn.Module:
    """The callable module of a variant (eager: the model itself)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    opts = VARIANTS[variant]
    if opts is None:
        return model
    # Static shapes: a training run feeds one batch shape (train.py pads captions to a multiple of 16).
    return torch.compile(model, dynamic=False, **opts)


# ----------------------------------------------------------------------------- measuring
def count_flops(model: torch.nn.Module, batch: dict[str, torch.Tensor], caption_in_every_pass: bool = False) -> float:
    """FLOPs of one forward + backward (eager), per sample. The optimiser step is not counted.

    `caption_in_every_pass`: the intermediate fine passes also run over the caption (and score it),
    as the model did before they ran without it."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    custom = {}
    # The CPU SDPA kernel has no formula in FlopCounterMode; it does the same matmuls as flash.
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        custom[aten._scaled_dot_product_flash_attention_for_cpu] = (
            lambda q, k, v, *_, **__: flop_counter.sdpa_flop_count(q, k, v))
        custom[aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
            lambda g, q, k, v, *_, **__: flop_counter.sdpa_backward_flop_count(g, q, k, v))
    device = batch["dino"].device
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=custom)
    with counter, torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = model(batch, score_all_passes=caption_in_every_pass)
        out["loss"].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch["dino"].shape[0]


def measure(variant: str, args: argparse.Namespace, device: torch.device, flops_per_sample: float | None) -> dict:
    """Build a fresh model, run warm-up and timed steps; one result row."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = random_init_model(args.lm, args.fine_iterations, args.dim, args.seed, **model_options(args)).to(device)
    use_causal_sdpa(model.lm)  # as load_lm gives every LM: is_causal SDPA, no mask, native GQA
    if args.channels_last:
        model.head.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, lr=1e-4, weight_decay=0.01, device=device)
    batch = synthetic_batch(model, args.batch_size, args.frames, args.tokens, args.dim, args.caption_tokens, device,
                            args.seed)
    fn = wrap(model, variant)
    counters = torch._dynamo.utils.counters
    counters.clear()
    times, first, result = [], None, None
    for i in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        result = train_step(model, fn, optimizer, [batch], clip=1.0, read=False)  # as the loop runs it
        sync(device)
        dt = time.perf_counter() - t0
        if i == 0:
            first = dt
        if i >= args.warmup:
            times.append(dt)
    with count_host_reads() as reads:  # one more step, as the loop runs a step it does not log
        result = train_step(model, fn, optimizer, [batch], clip=1.0, read=False)
    sync(device)
    median = statistics.median(times)
    row = {
        "variant": variant, "device": device_name(device), "lm": args.lm, "batch": args.batch_size,
        "frames": args.frames, "tokens": args.tokens, "caption_tokens": args.caption_tokens,
        "fine_iterations": args.fine_iterations, "channels_last": args.channels_last,
        "samples_per_s": args.batch_size / median, "step_ms_median": median * 1e3,
        "step_ms_min": min(times) * 1e3, "first_step_s": first, "steps": len(times),
        "peak_memory_gb": peak_memory_gb(device), "flops_per_sample": flops_per_sample,
        "loss": float(result["loss"]),
        "host_reads": sum(reads.values()), "host_reads_by_kind": dict(reads),
        # Compilation health: graphs compiled, graph breaks, and steps CUDA graphs were skipped for.
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"]),
    }
    peak = peak_flops(device)
    row["mfu"] = (flops_per_sample * row["samples_per_s"] / peak) if (peak and flops_per_sample) else None
    del model, optimizer, fn, batch
    if variant != "eager":
        torch._dynamo.reset()  # the next variant compiles afresh (the on-disk inductor cache stays)
    return row


def model_options(args: argparse.Namespace) -> dict:
    """The next-frame head and the loss weight the step is measured with (lambda_recon 0: no head backward)."""
    return {"recon_head": args.recon_head, "lambda_recon": args.lambda_recon}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu x{torch.get_num_threads()} threads"


def fmt_row(r: dict) -> str:
    if "error" in r:
        return f"| {r['variant']} | {r.get('batch', '')} | failed: {r['error']} | | | | | | | |"
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
    flops = f"{r['flops_per_sample'] / 1e9:.1f}" if r.get("flops_per_sample") else "n/a"
    health = f"{r['graphs']}/{r['graph_breaks']}/{r['cudagraph_skips']}" if r["variant"] != "eager" else ""
    return (f"| {r['variant']} | {r['batch']} | {r['samples_per_s']:.1f} | {r['step_ms_median']:.1f} | "
            f"{r['first_step_s']:.1f} | {r['peak_memory_gb']:.2f} | {flops} | {mfu} | {health} | "
            f"{r['host_reads']} |")


HEADER = ("| variant | batch | samples/s | step ms (median) | first step s | peak mem GB | GFLOP/sample | "
          "of bf16 peak | graphs/breaks/cudagraph skips | host reads per step |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--lm", choices=["smollm2", "tiny"], default="smollm2")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--caption-tokens", type=int, default=64, help="Padded caption length (input has one less).")
    p.add_argument("--fine-iterations", type=int, default=2)
    p.add_argument("--tokens", type=int, default=325, help="DINO tokens per frame.")
    p.add_argument("--dim", type=int, default=384, help="DINO width.")
    p.add_argument("--steps", type=int, default=20, help="Timed steps per variant.")
    p.add_argument("--warmup", type=int, default=3, help="Untimed steps first (compilation happens here).")
    p.add_argument("--variants", default="eager,compiled")
    p.add_argument("--device", default=None, help="[default: cuda if available, else cpu]")
    p.add_argument("--channels-last", action="store_true", help="Prediction head convolutions channels-last.")
    p.add_argument("--no-flops", action="store_true", help="Skip the FLOP count.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recon-head", choices=RECON_HEADS, default="film", help="Next-frame head (train.py --recon-head).")
    p.add_argument("--lambda-recon", type=float, default=0.1, help="0: caption-only (the head runs without a graph).")
    p.add_argument("--json", default=None, help="Also write the rows here (JSON list).")
    args = p.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")

    flops = None
    if not args.no_flops:
        model = random_init_model(args.lm, args.fine_iterations, args.dim, args.seed, **model_options(args)).to(device)
        batch = synthetic_batch(model, args.batch_size, args.frames, args.tokens, args.dim, args.caption_tokens, device,
                                args.seed)
        flops = count_flops(model, batch)
        before = count_flops(model, batch, caption_in_every_pass=True)
        print(f"# GFLOP/sample: {flops / 1e9:.1f} (intermediate fine passes without the caption); "
              f"{before / 1e9:.1f} with the caption in every pass, as before ({100 * (flops / before - 1):+.1f}%)",
              flush=True)
        del model, batch
    print(f"# {device_name(device)}; torch {torch.__version__}; lm={args.lm} batch={args.batch_size} "
          f"frames={args.frames} tokens={args.tokens}x{args.dim} caption={args.caption_tokens} "
          f"fine_iterations={args.fine_iterations} recon_head={args.recon_head} lambda_recon={args.lambda_recon} "
          f"steps={args.steps} warmup={args.warmup}", flush=True)
    rows = []
    for v in variants:
        if v.endswith("-cg") and device.type != "cuda":
            rows.append({"variant": v, "batch": args.batch_size, "error": "CUDA graphs need a CUDA device"})
            continue
        try:
            rows.append(measure(v, args, device, flops))
        except Exception as e:  # one failing variant (OOM, compile error) must not lose the others
            msg = " ".join(str(e).split())[:200]
            rows.append({"variant": v, "batch": args.batch_size, "error": f"{type(e).__name__}: {msg}"})
            with contextlib.suppress(Exception):
                torch._dynamo.reset()
        print(fmt_row(rows[-1]), flush=True)
        if args.json:  # after every variant: a run killed by a time limit keeps what it measured
            Path(args.json).write_text(json.dumps(rows, indent=2))
    print(HEADER)
    for r in rows:
        print(fmt_row(r))
    if all("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
