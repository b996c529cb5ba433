"""The reporter's per-epoch time with 2 DDP workers evaluating sharded val vs 1 process.

Both runs evaluate the same model on the same val set (N rows, an MLP wide enough that the
forward passes dominate) with the same PostHocReporter: one process with the whole val loader,
or W processes (gloo, one thread each, as Ray Train's CPU workers) whose val loaders go
through a ``DistributedSampler``, each evaluating its shard, rank 0 gathering. Reported on
rank 0, medians over the epochs after the first: ``step()`` in all (SWA update, base and SWA
forward passes over val and test, TS, metrics, store write) and the val forward pass of the
live model alone.

Run: .venv/bin/python benchmarks/sharded_eval.py   (prints a markdown table)
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

N_VAL, N_TEST, N_IN, WIDTH, C, EPOCHS = 20_000, 2_000, 256, 2048, 100, 6


def _worker(rank: int, world: int, init: str, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from posthoc_tune import PostHocReporter

    g = torch.Generator().manual_seed(0)
    x_val, x_test = torch.randn(N_VAL, N_IN, generator=g), torch.randn(N_TEST, N_IN, generator=g)
    y_val = torch.randint(0, C, (N_VAL,), generator=g)
    y_test = torch.randint(0, C, (N_TEST,), generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(N_IN, WIDTH), torch.nn.ReLU(), torch.nn.Linear(WIDTH, C)
    )
    dataset = torch.utils.data.TensorDataset(x_val, y_val)
    sampler: torch.utils.data.Sampler[int] = torch.utils.data.DistributedSampler(
        dataset, world, rank, shuffle=False
    )
    val = torch.utils.data.DataLoader(dataset, batch_size=1024, sampler=sampler)
    reporter = PostHocReporter(
        model, {"seed": 0}, val=val, test=(x_test, y_test), store=store, trial_id="t0"
    )
    steps, forwards = [], []
    for _ in range(EPOCHS):
        with torch.no_grad():
            for p in model.parameters():  # "training": the weights move each epoch
                p.add_(0.001 * torch.randn_like(p))
        dist.barrier()
        start = time.perf_counter()
        with torch.no_grad():
            for x, _ in val:
                model(x)
        dist.barrier()
        forwards.append(time.perf_counter() - start)
        start = time.perf_counter()
        reporter.step()
        dist.barrier()
        steps.append(time.perf_counter() - start)
    if rank == 0:
        np.save(out, np.array([steps, forwards]))
    dist.destroy_process_group()


def measure(world: int) -> tuple[float, float]:
    """Median step() and val-forward seconds on rank 0, epochs 2.. (the first warms up)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp, "times.npy"))
        init = f"file://{Path(tmp, 'rendezvous')}"
        mp.spawn(_worker, args=(world, init, str(Path(tmp, "exp")), out), nprocs=world)
        steps, forwards = np.load(out)
    return statistics.median(steps[1:]), statistics.median(forwards[1:])


def main() -> None:
    print(f"N = {N_VAL:,} val + {N_TEST:,} test rows, MLP {N_IN}-{WIDTH}-{C}, one thread each\n")
    print("| processes | step() ms | vs 1 process | val forward ms | vs 1 process |")
    print("|---|---|---|---|---|")
    one = measure(1)
    for world, (step, forward) in ((1, one), (2, measure(2))):
        print(
            f"| {world} | {1e3 * step:.0f} | {step / one[0]:.2f} | {1e3 * forward:.0f} | "
            f"{forward / one[1]:.2f} |"
        )


if __name__ == "__main__":
    main()
