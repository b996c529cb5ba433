"""The reporter's per-epoch overhead next to a training epoch, on a GPU (issue 7).

A CIFAR-sized synthetic task (32x32x3 images, 10 classes; 10,000 train, 5,000 val and 5,000
test rows by default) and the CIFAR-N example's ResNet-18, trained with mixed precision
(autocast + GradScaler, channels-last) on one device. Each epoch times the training pass and
then ``PostHocReporter.step()``: the SWA update, BatchNorm re-estimation for the SWA model,
base and SWA predictions on val and test, four temperature fits, 32 metrics and the Parquet
write. ``plain eval`` is the one base-model pass over val that a loop without the reporter
would run anyway. Times are medians over the epochs after the first (warm-up).

Run by ``benchmarks/gpu_check.sh`` on a GPU; ``--device cpu`` with small sizes checks the
script itself (tests/test_examples.py does). That CPU check runs in PyTorch's native kernels, in
the default memory format: oneDNN's AVX2 1x1-convolution backward deadlocked at these ResNet
shapes (width 4) on a 2-core AMD EPYC, spinning in its OpenMP barrier, and CPU timings are not
what this script measures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812 (the usual alias)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for examples/

from examples.cifar10n import augment, resnet18
from posthoc_tune import PostHocReporter


def _timed(device: torch.device, fn: Callable[[], object]) -> float:
    """Seconds ``fn`` takes, waiting for the device's queued work on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _kernels(device: torch.device) -> AbstractContextManager[object]:
    """No oneDNN on the CPU (see the module's docstring); the device's defaults elsewhere."""
    return torch.backends.mkldnn.flags(enabled=False) if device.type == "cpu" else nullcontext()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device)
    parser.add_argument("--train", type=int, default=10_000, help="training images")
    parser.add_argument("--val", type=int, default=5_000)
    parser.add_argument("--test", type=int, default=5_000)
    parser.add_argument("--epochs", type=int, default=4, help="the first is warm-up")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--width", type=int, default=64, help="64: the standard ResNet-18")
    parser.add_argument("--no-amp", action="store_true", help="train in float32")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error(f"--epochs must be >= 2 (the first is warm-up), got {args.epochs}")
    device = torch.device(args.device)
    amp = not args.no_amp and device.type == "cuda"

    gen = torch.Generator().manual_seed(0)
    sizes = (args.train, args.val, args.test)
    x = torch.randn(sum(sizes), 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (sum(sizes),), generator=gen).to(device)
    (x_train, x_val, x_test), (y_train, y_val, y_test) = x.split(sizes), y.split(sizes)

    torch.manual_seed(0)
    model = resnet18(args.width, 10).to(device)
    if device.type == "cuda":  # tensor cores want NHWC; on the CPU it selects oneDNN kernels
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)

    def train_epoch() -> None:
        model.train()
        for batch in torch.randperm(args.train, device=device).split(args.batch_size):
            with torch.autocast(device.type, enabled=amp):
                loss = F.cross_entropy(model(augment(x_train[batch])), y_train[batch])
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    def plain_eval() -> None:
        model.eval()
        with torch.no_grad():
            for chunk in x_val.split(1000):
                model(chunk).float().cpu()

    times: dict[str, list[float]] = {"train": [], "reporter": [], "plain eval": []}
    with _kernels(device), tempfile.TemporaryDirectory() as store:
        reporter = PostHocReporter(
            model,
            {"seed": 0},
            val=(x_val, y_val),
            test=(x_test, y_test),
            store=store,
            eval_batch_size=1000,
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.epochs):
            times["train"].append(_timed(device, train_epoch))
            times["plain eval"].append(_timed(device, plain_eval))
            times["reporter"].append(_timed(device, reporter.step))
        stored_mb = sum(f.stat().st_size for f in Path(store).rglob("*") if f.is_file()) / 2**20

    median = {k: statistics.median(v[1:]) for k, v in times.items()}
    out = {f"{k} s": v for k, v in median.items()}
    out["reporter / train"] = median["reporter"] / median["train"]
    out["store MB per epoch"] = stored_mb / args.epochs
    if device.type == "cuda":
        out["peak GPU memory GB"] = torch.cuda.max_memory_allocated(device) / 2**30
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device: {name}; torch {torch.__version__}; amp={amp}; ResNet-18 width {args.width}; "
        f"train/val/test {args.train}/{args.val}/{args.test}; batch {args.batch_size}; "
        f"medians over epochs 2..{args.epochs}"
    )
    print("| " + " | ".join(out) + " |")
    print("|" + "---|" * len(out))
    print("| " + " | ".join(f"{v:.3f}" for v in out.values()) + " |")
    return out


if __name__ == "__main__":
    main()
