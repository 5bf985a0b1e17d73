"""Training throughput and peak memory of r3d_18 at 128^3 on a GPU (issue 4, part 3).

    python benchmarks/gpu_train_speed.py --json gpu_train_speed.json      # default sweep, one H100
    python benchmarks/gpu_train_speed.py --batch-sizes 2 32 --precision bf16 --compile off on
    python benchmarks/gpu_train_speed.py --plan full --batch-sizes 8 32   # every combination of the axes
    python benchmarks/gpu_train_speed.py --device cpu --size 16 --batch-sizes 2 --steps 1   # smoke test

The training step is the one of ``workflow_scripts.learning.train`` (model from ``build_model`` with the
dissertation's freezing, stem..layer3 frozen; AdamW over ``parameter_groups``; ``train_mode``;
cross-entropy; cuDNN benchmark mode on CUDA), on random weights and synthetic
float16 volumes written like the tensor cache writes them (``train_speed.write_scans``).
Axes, each restricted from the command line:

- batch size; ``--compile`` off/on (``torch.compile`` of the model; its compilation falls in the
  warm-up steps, reported as ``warm-up s``); ``--precision`` bf16 autocast / fp32 (cuDNN's
  default TF32 convolutions); ``--channels-last`` channels_last_3d model and input on/off;
- ``--data loader``: the real ``ScanDataset`` + ``make_loader`` (workers, TorchIO augmentation on
  CPU, pinned memory, non_blocking copies), over an epoch of ``--epoch`` entries cycling through
  the ``--scans`` files; ``--data gpu-resident``: the files uploaded once to the device as one
  float16 tensor, batches indexed there and augmented there by ``augment_on_device``.

``--plan sweep`` (default) runs the first value of every axis (bf16, channels_last on,
gpu-resident, eager) and then each other value with the rest at the first, at every batch size;
``--plan full`` runs every combination. Compiled settings come last (slowest to warm up), so a
run cut short still has the eager rows (the JSON is rewritten after every row); the default sweep
(25 settings) is sized for about 8 minutes on one H100, most of it compilation: ``--compile off``
to leave that out. On CPU, bf16 and compile are dropped with a note.

``augment_on_device`` lives here, not in ``workflow_scripts.learning.train``: training does not use it yet.
tests/test_gpu_benchmark.py checks its statistics against ``VolumeTransform``'s; move it into
the product together with a resident-data training path if the benchmark says that path pays.

Measurements per setting (one fresh model each, ``--warmup`` untimed steps first):

- ms/step and volumes/s: wall clock over the timed steps; every step ends with a device
  synchronize, as the training loop's ``.cpu()`` of the logits does. Loader settings time at
  least 3 x workers steps: a worker delivers whole batches, so the loader's pace only shows
  over several rounds of all workers.
- data wait %: wall time spent obtaining the batch (loader: blocked on the DataLoader, plus
  issuing the copy; gpu-resident: issuing the indexing and augmentation, which on CUDA run
  asynchronously and count as GPU work) over the step time.
- aug ms: GPU time of indexing + augmentation per step (CUDA events around it; wall time on CPU);
  gpu-resident only.
- GPU busy %: ``--profile-steps`` further steps under torch.profiler (CUDA activity); the union of
  the intervals of all device events (kernels, copies, memsets) over the wall time of those
  steps. Profiling adds a little CPU time per operator, so this slightly understates the share.
- peak GB: ``torch.cuda.max_memory_allocated`` since the setting began (statistics reset); it
  includes the resident data tensor (``data GB``), which for a real epoch of N scans is
  N x size^3 x 2 bytes (1,023 scans at 128^3: 4.3 GB).
- A CUDA out-of-memory error is recorded as status OOM and the sweep goes on; any other error
  is recorded with its message (traceback on stderr) and makes the exit status 1.

The frozen-backbone check (``frozen_backbone_check``) trains one batch with (a) the dissertation's
freezing (trainable from layer4) and (b) everything trainable, and shows that with (a) autograd
does no work in stem..layer3: every frozen parameter's ``.grad`` stays None, and a profiled step
has one ``aten::convolution_backward`` per convolution with a trainable weight (5 in layer4 of
r3d_18, against 20 with everything trainable); step time and peak memory show the saving.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.train_speed import write_scans  # noqa: E402
from workflow_scripts.learning.models import build_model, parameter_groups, train_mode  # noqa: E402
from workflow_scripts.learning.recipe import training_settings  # noqa: E402
from workflow_scripts.common.devices import pick_device  # noqa: E402
from workflow_scripts.learning.scan_data import ScanDataset, VolumeTransform, make_loader  # noqa: E402
from workflow_scripts.learning.train import forward  # noqa: E402

CROSS_ENTROPY = nn.CrossEntropyLoss()

EPOCH_SCANS = 1023  # training scans per epoch in the yardstick
TARGET_VOLUMES_PER_S = 200.0
TARGET_BUSY_PCT = 90.0
# Axis values in the order the sweep uses them: the first is the baseline. Compile goes last.
AXES = {"precision": ("bf16", "fp32"), "channels_last": ("on", "off"), "data": ("gpu-resident", "loader"),
        "compile": ("off", "on")}
CPU_SKIPS = {("precision", "bf16"): "bf16 autocast skipped on CPU (the GPU path is what is measured)",
             ("compile", "on"): "torch.compile skipped on CPU (slow to build; the GPU path is what is measured)"}


@dataclass(frozen=True)
class Setting:
    batch_size: int
    precision: str
    channels_last: str
    data: str
    compile: str


# ----------------------------------------------------------------------------- augmentation on the device

def augment_on_device(volumes: torch.Tensor, gamma_log_range: Sequence[float] = (-0.2, 0.2), gamma_p: float = 0.3,
                      noise_std_range: Sequence[float] = (0.0, 0.1), noise_p: float = 0.3) -> torch.Tensor:
    """The training recipe of ``VolumeTransform`` on a batch (B, 1, x, y, z) in [0, 1], in tensor ops.

    Per volume: with probability ``gamma_p`` v**exp(U(log range)); with probability ``noise_p``
    Gaussian noise of std U(std range); then z-normalisation over the brain (voxels > 0 before
    the noise), unbiased std as TorchIO. Returns float32; no host sync, so it queues behind the step.
    """
    x = volumes.float()
    brain = x > 0
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.empty(shape, device=x.device).uniform_(low, high)

    gamma = torch.where(torch.rand(shape, device=x.device) < gamma_p, uniform(*gamma_log_range).exp(), 1.0)
    x = x.pow(gamma)  # values are >= 0 here, where TorchIO's power is the plain power
    std = torch.where(torch.rand(shape, device=x.device) < noise_p, uniform(*noise_std_range), 0.0)
    x = x + torch.randn_like(x) * std
    dims = tuple(range(1, x.dim()))
    count = brain.sum(dims, keepdim=True)
    mean = torch.where(brain, x, 0.0).sum(dims, keepdim=True) / count
    var = torch.where(brain, (x - mean) ** 2, 0.0).sum(dims, keepdim=True) / (count - 1)
    return (x - mean) / var.sqrt()


# ----------------------------------------------------------------------------- data sources

class ResidentBatches:
    """All scans uploaded once as one float16 tensor on ``device``; random batches augmented there."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], device: torch.device, batch_size: int):
        stacked = np.stack([np.load(p) for p in paths]).astype(np.float16)
        self.volumes = torch.from_numpy(stacked)[:, None].to(device)
        self.labels = torch.tensor(list(labels), device=device)
        self.device, self.batch_size = device, batch_size
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.wall_s = 0.0

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        cuda = self.device.type == "cuda"
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        tick = time.perf_counter()
        index = torch.randint(len(self.volumes), (self.batch_size,), device=self.device)
        x = augment_on_device(self.volumes[index])
        if cuda:
            end.record()
            self.events.append((start, end))
        else:
            self.wall_s += time.perf_counter() - tick
        return x, self.labels[index]

    def augment_seconds(self) -> float:
        """Device time of indexing + augmentation since the last call (synchronizes)."""
        if self.events:
            torch.cuda.synchronize(self.device)
        seconds = self.wall_s + sum(s.elapsed_time(e) for s, e in self.events) / 1000
        self.events, self.wall_s = [], 0.0
        return seconds

    @property
    def nbytes(self) -> int:
        return self.volumes.numel() * self.volumes.element_size()

    def close(self) -> None:
        del self.volumes


class LoaderBatches:
    """The training DataLoader (workers, TorchIO augmentation, pinned memory), cycling over epochs."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], device: torch.device, batch_size: int,
                 workers: int, epoch: int):
        sources = [paths[i % len(paths)] for i in range(epoch)]
        recipe = training_settings(None).train  # the schema's augmentation and z-normalisation
        transform = VolumeTransform(train=True, **recipe.augmentation, znorm_mask=recipe.znorm_mask)
        dataset = ScanDataset(sources, [labels[i % len(labels)] for i in range(epoch)], transform, seed=0)
        self.loader = make_loader(dataset, batch_size, True, 0, workers, pin_memory=device.type == "cuda")
        self.device, self.epoch = device, 0
        self.iterator = iter(self.loader)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            x, y, _ = next(self.iterator)
        except StopIteration:
            self.epoch += 1
            self.loader.sampler.set_epoch(self.epoch)
            self.iterator = iter(self.loader)
            x, y, _ = next(self.iterator)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def augment_seconds(self) -> float | None:
        return None  # done by the CPU workers, inside the data wait

    nbytes = None  # nothing resident on the device

    def close(self) -> None:
        del self.iterator, self.loader  # shuts the workers down


# ----------------------------------------------------------------------------- the step

def build(arch: str, trainable_from: str, device: torch.device, channels_last: bool,
          compiled: bool = False, compile_mode: str = "default") -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """(model, the module to call, its optimizer) set up as ``train.new_training_state`` does, random weights."""
    job = training_settings(None, {"arch": arch, "weights": "none", "trainable_from": trainable_from})
    model = build_model(**job.model).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    optimizer = torch.optim.AdamW(parameter_groups(model, lr_head=job.train.lr_head, lr_backbone=job.train.lr_backbone),
                                  weight_decay=job.train.weight_decay)
    train_mode(model)
    net = torch.compile(model, mode=compile_mode) if compiled else model
    return model, net, optimizer


def forward_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool, channels_last: bool) -> torch.Tensor:
    """The loss of one batch, by ``train.forward`` with bf16 and channels_last as chosen."""
    return forward(net, x, y, CROSS_ENTROPY, x.device, precision="bf16" if bf16 else "fp32",
                   channels_last=channels_last)[1]


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, bf16: bool,
               channels_last: bool) -> torch.Tensor:
    """One optimisation step, the order of ``train.run_epoch``."""
    loss = forward_loss(net, x, y, bf16, channels_last)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(net: nn.Module, optimizer: torch.optim.Optimizer, batches, device: torch.device, n: int,
               bf16: bool, channels_last: bool) -> dict[str, float]:
    """Wall seconds of ``n`` synchronized steps, and of the part spent obtaining batches."""
    total = wait = 0.0
    for _ in range(n):
        tick = time.perf_counter()
        x, y = batches()
        got = time.perf_counter()
        train_step(net, optimizer, x, y, bf16, channels_last)
        synchronize(device)
        total += time.perf_counter() - tick
        wait += got - tick
    return {"total_s": total, "wait_s": wait}


def device_busy_seconds(events) -> float:
    """Length of the union of the time intervals of the profiler's CUDA events (kernels, copies)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, -float("inf")
    for start, stop in spans:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy / 1e6


def gpu_busy_pct(net: nn.Module, optimizer: torch.optim.Optimizer, batches, device: torch.device, n: int,
                 bf16: bool, channels_last: bool) -> float:
    """Share of the wall time of ``n`` steps during which the GPU had work (profiled)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = time_steps(net, optimizer, batches, device, n, bf16, channels_last)["total_s"]
    return 100 * min(1.0, device_busy_seconds(prof.events()) / wall)


# ----------------------------------------------------------------------------- one setting

def measure_setting(setting: Setting, paths: Sequence[Path], device: torch.device,
                    args: argparse.Namespace) -> dict[str, Any]:
    """Throughput, data wait, augmentation time, GPU busy share and peak memory of one setting."""
    bf16, channels_last = setting.precision == "bf16", setting.channels_last == "on"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if setting.compile == "on":
        torch._dynamo.reset()
    torch.manual_seed(0)
    labels = [i % 2 for i in range(len(paths))]
    _, net, optimizer = build(args.arch, args.trainable_from, device, channels_last, setting.compile == "on",
                              args.compile_mode)
    batches = ResidentBatches(paths, labels, device, setting.batch_size) if setting.data == "gpu-resident" \
        else LoaderBatches(paths, labels, device, setting.batch_size, args.workers, args.epoch)
    try:
        run = (net, optimizer, batches, device)
        warm = time_steps(*run, args.warmup, bf16, channels_last)
        batches.augment_seconds()
        steps = args.steps if setting.data == "gpu-resident" else max(args.steps, 3 * args.workers)
        timed = time_steps(*run, steps, bf16, channels_last)
        augment = batches.augment_seconds()
        busy = gpu_busy_pct(*run, args.profile_steps, bf16, channels_last) \
            if device.type == "cuda" and args.profile_steps > 0 else None
        data_bytes = batches.nbytes
    finally:
        batches.close()
    step = timed["total_s"] / steps
    return {"status": "ok", "steps": steps, "ms_per_step": 1000 * step, "volumes_per_s": setting.batch_size / step,
            "epoch_s": args.epoch * step / setting.batch_size,
            "data_wait_pct": 100 * timed["wait_s"] / timed["total_s"],
            "aug_ms": None if augment is None else 1000 * augment / steps, "gpu_busy_pct": busy,
            "warmup_s": warm["total_s"], "data_gb": None if data_bytes is None else data_bytes / 1e9,
            "peak_gb": peak_gb(device)}


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def is_oom(err: BaseException) -> bool:
    """A CUDA out-of-memory error, also when torch.compile wraps it in its own exception."""
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_setting(setting: Setting, paths: Sequence[Path], device: torch.device, args: argparse.Namespace) -> dict:
    """One row of the table: the setting and its measurements, or its status OOM / error."""
    row: dict[str, Any] = asdict(setting)
    try:
        row.update(measure_setting(setting, paths, device, args))
    except Exception as err:  # one failing setting must not end the sweep
        if is_oom(err):
            row.update(status="OOM", peak_gb=peak_gb(device))
        else:
            traceback.print_exc()
            row["status"] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    free_memory(device)
    return row


# ----------------------------------------------------------------------------- frozen-backbone check

def trainable_convs(model: nn.Module) -> int:
    """Convolutions with a trainable weight: each needs exactly one convolution_backward."""
    return sum(isinstance(m, nn.Conv3d) and m.weight.requires_grad for m in model.modules())


def backward_work(net: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, bf16: bool,
                  channels_last: bool) -> dict[str, int]:
    """Counts, from a profiled step, of convolution backward calls and of autograd nodes run."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(net, optimizer, x, y, bf16, channels_last)
    names = [e.name for e in prof.events()]
    return {"conv_backward_calls": names.count("aten::convolution_backward"),
            "autograd_nodes": sum(n.startswith("autograd::engine::evaluate_function:") for n in names)}


def mean_seconds(fn, n: int, device: torch.device) -> float:
    """Mean wall seconds of ``n`` synchronized calls of ``fn``."""
    start = time.perf_counter()
    for _ in range(n):
        fn()
        synchronize(device)
    return (time.perf_counter() - start) / n


def backbone_run(trainable_from: str, x: torch.Tensor, y: torch.Tensor, arch: str, steps: int, bf16: bool,
                 channels_last: bool) -> dict[str, Any]:
    """Gradients, backward work, times and peak memory of training ``arch`` from ``trainable_from``."""
    device = x.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model, net, optimizer = build(arch, trainable_from, device, channels_last)
    step = lambda: train_step(net, optimizer, x, y, bf16, channels_last)  # noqa: E731
    step()  # warm-up: cuDNN picks its algorithms
    work = backward_work(net, optimizer, x, y, bf16, channels_last)
    params = list(model.named_parameters())
    result = {
        "trainable_from": trainable_from,
        "trainable_params": sum(p.numel() for _, p in params if p.requires_grad),
        "frozen_params": sum(p.numel() for _, p in params if not p.requires_grad),
        "frozen_with_grad": [n for n, p in params if not p.requires_grad and p.grad is not None],
        "trainable_without_grad": [n for n, p in params if p.requires_grad and p.grad is None],
        "trainable_convs": trainable_convs(model), **work,
        "forward_ms": 1000 * mean_seconds(lambda: forward_loss(net, x, y, bf16, channels_last), steps, device),
        "step_ms": 1000 * mean_seconds(step, steps, device),
        "peak_gb": peak_gb(device)}
    result["backward_update_ms"] = result["step_ms"] - result["forward_ms"]
    del model, net, optimizer
    free_memory(device)
    return result


def frozen_backbone_check(size: int = 128, batch_size: int = 8, device: str | torch.device = "cpu",
                          arch: str = "r3d_18", steps: int = 3, bf16: bool | None = None,
                          channels_last: bool | None = None) -> dict[str, dict[str, Any]]:
    """The dissertation's freezing (trainable from layer4) against everything trainable, on one batch.

    bf16 and channels_last default to on for CUDA and off elsewhere, as in training.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    bf16 = cuda if bf16 is None else bf16
    channels_last = cuda if channels_last is None else channels_last
    generator = torch.Generator().manual_seed(0)
    x = augment_on_device(torch.rand((batch_size, 1) + (size,) * 3, generator=generator).to(device))
    y = (torch.arange(batch_size) % 2).to(device)
    runs = {}
    for trainable_from in ("layer4", "stem"):
        try:
            runs[trainable_from] = backbone_run(trainable_from, x, y, arch, steps, bf16, channels_last)
        except Exception as err:
            if not is_oom(err):
                raise
            runs[trainable_from] = {"trainable_from": trainable_from, "status": "OOM"}
            free_memory(device)
    return runs


# ----------------------------------------------------------------------------- planning and output

def usable_axes(axes: dict[str, Sequence[str]], device: torch.device) -> tuple[dict[str, list[str]], list[str]]:
    """The axis values this device runs, and a note for each one dropped."""
    kept, notes = {}, []
    for axis, values in axes.items():
        kept[axis] = []
        for value in values:
            skip = CPU_SKIPS.get((axis, value)) if device.type != "cuda" else None
            if skip:
                notes.append(skip)
            elif value not in kept[axis]:
                kept[axis].append(value)
        if not kept[axis]:
            raise SystemExit(f"no value of --{axis.replace('_', '-')} runs on {device.type}: {', '.join(notes)}")
    return kept, notes


def plan_settings(batch_sizes: Sequence[int], axes: dict[str, Sequence[str]], full: bool = False) -> list[Setting]:
    """Every combination (``full``), or the baseline (first values) and one changed axis at a time."""
    names = list(AXES)
    if full:
        combos = [dict(zip(names, values)) for values in itertools.product(*(axes[a] for a in names))]
    else:
        base = {a: axes[a][0] for a in names}
        combos = [base] + [{**base, a: v} for a in names for v in axes[a][1:]]
    combos.sort(key=lambda c: c["compile"] == "on")  # stable: compiled settings last
    return [Setting(b, **c) for c in combos for b in batch_sizes]


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


ROW_COLUMNS = [("batch", "batch_size", 0), ("compile", "compile", 0), ("precision", "precision", 0),
               ("channels_last", "channels_last", 0), ("data", "data", 0), ("volumes/s", "volumes_per_s", 1),
               ("ms/step", "ms_per_step", 1), (f"epoch s ({EPOCH_SCANS})", "epoch_s", 1),
               ("data wait %", "data_wait_pct", 1), ("aug ms", "aug_ms", 1), ("GPU busy %", "gpu_busy_pct", 1),
               ("peak GB", "peak_gb", 2), ("data GB", "data_gb", 2), ("warm-up s", "warmup_s", 1),
               ("status", "status", 0)]
CHECK_COLUMNS = [("trainable from", "trainable_from", 0), ("trainable params", "trainable_params", 0),
                 ("frozen params", "frozen_params", 0), ("frozen params with grad", "frozen_with_grad", 0),
                 ("trainable convs", "trainable_convs", 0), ("convolution_backward calls", "conv_backward_calls", 0),
                 ("autograd nodes", "autograd_nodes", 0), ("forward ms", "forward_ms", 1),
                 ("step ms", "step_ms", 1), ("backward + update ms", "backward_update_ms", 1),
                 ("peak GB", "peak_gb", 2)]


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, int]]) -> str:
    def cell(row: dict, key: str, digits: int) -> str:
        value = row.get(key)
        return str(len(value)) if isinstance(value, list) else fmt(value, digits)

    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, key, d) for _, key, d in columns) + " |" for r in rows]
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def target_line(rows: Sequence[dict]) -> str:
    """The best setting against the issue's targets (200 volumes/s, GPU busy > 90%)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return "no setting completed"
    best = max(ok, key=lambda r: r["volumes_per_s"])
    busy = best["gpu_busy_pct"]
    met = best["volumes_per_s"] >= TARGET_VOLUMES_PER_S and busy is not None and busy > TARGET_BUSY_PCT
    return (f"best: {best['volumes_per_s']:.1f} volumes/s (batch {best['batch_size']}, {best['precision']}, "
            f"channels_last {best['channels_last']}, {best['data']}, compile {best['compile']}), an epoch of "
            f"{EPOCH_SCANS} scans in {EPOCH_SCANS / best['volumes_per_s']:.1f} s, GPU busy {fmt(busy)}%; "
            f"targets ({TARGET_VOLUMES_PER_S:.0f} volumes/s, busy > {TARGET_BUSY_PCT:.0f}%) "
            f"{'met' if met else 'not met'}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    for axis, values in AXES.items():
        p.add_argument(f"--{axis.replace('_', '-')}", nargs="+", choices=values, default=list(values),
                       help=f"values to run (first = sweep baseline; default: {' '.join(values)})")
    p.add_argument("--plan", choices=["sweep", "full"], default="sweep",
                   help="sweep: baseline + one axis changed at a time; full: every combination")
    p.add_argument("--size", type=int, default=128, help="volume side (128 = the pipeline's 128^3)")
    p.add_argument("--scans", type=int, default=64, help="synthetic scan files written (and uploaded when resident)")
    p.add_argument("--epoch", type=int, default=EPOCH_SCANS, help="loader dataset length, cycling over the files")
    p.add_argument("--workers", type=int, default=max(0, (os.cpu_count() or 2) - 2), help="DataLoader workers")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per setting (compilation, cuDNN autotuning)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    p.add_argument("--profile-steps", type=int, default=3, help="profiled steps for the GPU-busy share (0: skip)")
    p.add_argument("--arch", default="r3d_18")
    p.add_argument("--trainable-from", default="layer4", help="the dissertation's freezing: layer4")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--check-batch", type=int, default=8, help="batch size of the frozen-backbone check")
    p.add_argument("--check", choices=["on", "off", "only"], default="on", help="run the frozen-backbone check")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cuda, cuda:1, cpu")
    p.add_argument("--json", help="write device, versions, rows and check to this JSON file (after every row)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    axes, notes = usable_axes({a: getattr(args, a) for a in AXES}, device)
    settings = [] if args.check == "only" else plan_settings(args.batch_sizes, axes, args.plan == "full")
    report: dict[str, Any] = {
        "device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "tf32_convolutions": torch.backends.cudnn.allow_tf32, "args": vars(args), "notes": sorted(set(notes)),
        "frozen_backbone_check": None, "rows": []}

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))

    print(f"device: {report['device']}; torch {report['torch']} (CUDA {report['cuda']}, cuDNN {report['cudnn']}); "
          f"{args.arch} trainable from {args.trainable_from}, {args.size}^3, {args.scans} scan files, "
          f"loader epoch {args.epoch}, {args.workers} workers; {len(settings)} settings", flush=True)
    for note in report["notes"]:
        print(f"note: {note}", flush=True)
    if args.check != "off":
        check = frozen_backbone_check(args.size, args.check_batch, device, args.arch, max(1, args.steps))
        report["frozen_backbone_check"] = check
        save()
        print(f"\nfrozen-backbone check (batch {args.check_batch}):\n"
              + markdown_table(list(check.values()), CHECK_COLUMNS), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_scans(Path(tmp), args.scans, args.size) if settings else []
        for number, setting in enumerate(settings, 1):
            row = run_setting(setting, paths, device, args)
            report["rows"].append(row)
            save()
            label = ", ".join(f"{k} {v}" for k, v in asdict(setting).items())
            print(f"[{number}/{len(settings)}] {label}: {row['status']}, {fmt(row.get('volumes_per_s'))} volumes/s, "
                  f"warm-up {fmt(row.get('warmup_s'))} s", flush=True)
    if settings:
        print(f"\n{report['device']}, torch {report['torch']}, {args.arch} at {args.size}^3:\n"
              + markdown_table(report["rows"], ROW_COLUMNS))
        if device.type == "cuda":
            print(target_line(report["rows"]))
    return int(any(r["status"].startswith("error") for r in report["rows"]))


if __name__ == "__main__":
    raise SystemExit(main())
