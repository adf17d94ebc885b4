"""The training log: what an interval of steps reports, summed over every rank's videos."""

from __future__ import annotations

import json
import resource
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from fvlm_model import ModelConfig
from fvlm_model.evaluation import pass_metrics

from . import TrainError
from .checkpoint import run_folder_report
from .config import RunConfig
from .distributed import all_sum
from .step import SUMS


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB, process RSS on CPU


class IntervalLog:
    """The sums of the steps since the last log, kept on the device: a step adds to them without
    reading anything back, and `counts`/`metrics` read them when the loop logs. A loss is logged
    only for steps that were taken; non-finite steps are counted, with the longest run of them."""

    def __init__(self, device: torch.device | None = None, nonfinite_total: int = 0) -> None:
        self.device = device or torch.device("cpu")
        # SUMS, grad-norm sum, finite steps | non-finite steps, current run, longest run (this interval)
        self.acc = torch.zeros(len(SUMS) + 2, dtype=torch.float64, device=self.device)
        self.bad = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.nonfinite_total, self.longest_run = nonfinite_total, 0
        self.samples, self.start = 0, time.time()

    def reset(self) -> None:
        self.acc.zero_()
        self.samples, self.start = 0, time.time()

    def add(self, result: dict[str, Any], samples: int) -> None:
        """One `train_step` result over `samples` videos (of every rank): device tensors (read=False)
        or the host values of read=True."""
        self.samples += samples
        dev = self.device
        finite = torch.as_tensor(result["finite"], device=dev)
        values = torch.cat([torch.as_tensor(result["sums"], device=dev).double(),
                            torch.as_tensor(result["grad_norm"], device=dev).double().reshape(1),
                            torch.ones(1, dtype=torch.float64, device=dev)])
        self.acc += torch.where(finite, values, torch.zeros_like(values))
        run = torch.where(finite, torch.zeros_like(self.bad[1]), self.bad[1] + 1)
        self.bad.copy_(torch.stack([self.bad[0] + (~finite).double(), run, torch.maximum(self.bad[2], run)]))

    def counts(self) -> int:
        """Read the non-finite counters (a host read): the steps skipped since the last read, added to
        `nonfinite_total`; `longest_run` is the longest run of consecutive skipped steps seen since."""
        skipped, run, longest = (int(x) for x in self.bad.tolist())
        self.nonfinite_total += skipped
        self.longest_run = longest
        self.bad.copy_(torch.tensor([0.0, run, run], dtype=torch.float64))
        return skipped

    def metrics(self, lr: float, config: ModelConfig, device: torch.device, world_size: int) -> dict[str, float]:
        """The interval's metrics (a collective: every rank calls it), and a new interval."""
        total = all_sum(self.acc[: len(SUMS)].to(device), world_size).cpu()  # every rank's videos
        acc = self.acc.cpu()
        m: dict[str, float] = {"lr": lr, "samples_per_s": self.samples / (time.time() - self.start),
                               "peak_memory_gb": peak_memory_gb(device), "nonfinite_steps": self.nonfinite_total}
        if acc[-1] > 0:
            sums = dict(zip(SUMS, total.tolist(), strict=True))
            metrics = pass_metrics([sums["cap_sum_coarse"], sums["cap_sum_fine"]], sums["cap_tokens"],
                                   [sums["rec_sum_coarse"], sums["rec_sum_fine"]], sums["videos"], config)
            m.update({k: v for k, v in metrics.items() if not isinstance(v, list)})
            m["grad_norm"] = float(acc[-2] / acc[-1])
        self.reset()
        return m


def write_log(writer: Events, m: dict[str, float], step: int) -> None:
    for k, v in m.items():
        writer.add_scalar(k, v, step)
    if "loss" in m:
        tqdm.write(f"step {step}: loss {m['loss']:.4f} cap_fine {m['cap_fine']:.4f} cap_coarse "
                   f"{m['cap_coarse']:.4f} cap_ratio {m['cap_ratio']:.4f} rec_fine {m['rec_fine']:.4f} "
                   f"lr {m['lr']:.2e} {m['samples_per_s']:.1f} samples/s")


class Events:
    """The run's TensorBoard writer. Its events are written by a thread of TensorBoard's that keeps a failed
    write (a full disk) for the next call: any call that fails is a TrainError saying what the run folder holds,
    and the thread's own traceback is not printed."""

    def __init__(self, writer: SummaryWriter, run_dir: Path) -> None:
        self._writer, self.run_dir = writer, run_dir

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._writer, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except OSError as e:
                raise TrainError(f"cannot write TensorBoard events in {self.run_dir}: {e.strerror or e}; "
                                 f"{run_folder_report(self.run_dir)}") from None
        return call

    def close(self, quiet: bool = False) -> None:
        """Write what is queued and close; `quiet`: after another error, say nothing of this one."""
        failure = None
        for name in ("flush", "close"):  # flush raises the thread's failure, which close alone would not
            try:
                self.__getattr__(name)()
            except TrainError as e:
                failure = failure or e
        if failure is not None and not quiet:
            raise failure


def _quiet_event_thread_errors() -> None:
    """The event thread's OSError is raised again by the writer's next call (Events): not printed by the thread
    too. Other threads' errors go to the hook that was there."""
    previous = threading.excepthook
    if getattr(previous, "quiets_event_thread", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if not (type(args.thread).__module__.startswith("tensorboard.") and issubclass(args.exc_type, OSError)):
            previous(args)
    hook.quiets_event_thread = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def open_writer(run_dir: Path, config: RunConfig, step: int) -> Events:
    """The run folder with its run_config.json, and its TensorBoard writer from `step` on; a new run
    records its configuration as text and hparams."""
    _quiet_event_thread_errors()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run_config.json").write_text(json.dumps(config.to_dict(), indent=2))
        writer = Events(SummaryWriter(str(run_dir), purge_step=step + 1 if step else None), run_dir)
    except OSError as e:
        raise TrainError(f"cannot write to the run folder {run_dir}: {e.strerror or e}; "
                         f"{run_folder_report(run_dir)}") from None
    if step == 0:
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()}
        writer.add_text("hparams", "\n".join(f"    {k}: {v}" for k, v in sorted(hparams.items())), 0)
        writer.add_hparams(hparams, {"hparam/placeholder": 0.0}, run_name=".")
    return writer
