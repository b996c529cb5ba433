"""Tune a ResNet-18 on CIFAR-10-N with post-hoc selection: the paper's CIFAR-N setting, on GPUs.

OPTIONAL EXAMPLE: it downloads data and needs network access. It downloads the CIFAR-10 (or
CIFAR-100) training images through torchvision (about 170 MB) and the CIFAR-N human label file
from github.com/UCSC-REAL/cifar-10-100n into --data-dir. It needs the extra package torchvision
(pip install torchvision, matching your torch build), and ideally a GPU: the paper's code took
about 3 minutes per 100-epoch run on one GPU. Everything else in posthoc_tune runs offline.

As in the paper's code, the 50k training images are split 40k/5k/5k (index order) into train,
val and test, all carrying the chosen noisy label set (default: Worst, 40% noise); training is
SGD with a cosine schedule, batch size 500, random crop and flip, mixed precision (--no-amp
turns it off); the search space is search_spaces.cifar_n (lr, weight decay, width around the
paper's 0.1, 5e-4, 64). Unlike the paper, the ResNet-18 (3x3 stem, no max-pool) is trained from
scratch rather than fine-tuned from ImageNet weights.

posthoc_tune's part: each trial runs a PostHocReporter (SWA, temperature scaling, stored
logits); PostHocSearch (Optuna) proposes --configs configurations, each run as --seeds seeds;
PostHocASHA prunes whole seed groups on val/swa+ens+ts/nll, the loss of the temperature-scaled
ensemble of SWA models, so runs that only get good after SWA and ensembling are not cut early,
as pruning on the base model's loss would.
Four trials share each GPU with --gpus-per-trial 0.25.

    python examples/cifar10n.py --configs 8 --seeds 4 --gpus-per-trial 0.25
"""

from __future__ import annotations

import argparse
import os
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the usual alias)
from ray import tune
from torch import nn

import posthoc_tune as pht
from search_spaces import cifar_n

METRIC = "val/swa+ens+ts/nll"
LABEL_URL = "https://github.com/UCSC-REAL/cifar-10-100n/raw/main/data/{name}_human.pt"
# CIFAR-10 training-set channel statistics, close enough for CIFAR-100 too (the paper
# normalises with ImageNet's, for its ImageNet-pretrained model; ours starts from scratch)
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class CifarN(NamedTuple):
    """The CIFAR training images (uint8, N x 32 x 32 x 3, index order) and one CIFAR-N label set."""

    images: np.ndarray
    labels: np.ndarray
    n_classes: int


def download(dataset: str, label_set: str, root: str) -> CifarN:
    """Fetch (or reuse from ``root``) the CIFAR training images and the CIFAR-N labels."""
    try:
        import torchvision
    except ImportError:
        raise SystemExit(
            "examples/cifar10n.py needs torchvision to download CIFAR: "
            "pip install torchvision (a build matching your torch)"
        ) from None
    os.makedirs(root, exist_ok=True)
    cifar = torchvision.datasets.CIFAR10 if dataset == "cifar10n" else torchvision.datasets.CIFAR100
    images = np.asarray(cifar(root=root, train=True, download=True).data, dtype=np.uint8)
    name = "CIFAR-10" if dataset == "cifar10n" else "CIFAR-100"
    path = os.path.join(root, f"{name}_human.pt")
    if not os.path.exists(path):
        urllib.request.urlretrieve(LABEL_URL.format(name=name), path + ".part")
        os.replace(path + ".part", path)
    # The file pickles numpy arrays, which torch's weights-only loader rejects by default; it is
    # from the CIFAR-N authors' repository, where the paper's code loads it from too.
    table = torch.load(path, weights_only=False)
    labels = np.asarray(table[cifar_n.LABEL_FILE_KEYS[dataset][label_set]], dtype=np.int64)
    if labels.shape != (len(images),):
        raise ValueError(f"{path} has {labels.shape} labels for {len(images)} images")
    return CifarN(images, labels, cifar_n.n_classes(dataset, label_set))


class _Block(nn.Module):
    """ResNet basic block: two 3x3 convolutions and a (projected when needed) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18(width: int, n_classes: int) -> nn.Module:
    """ResNet-18 for 32x32 images: 3x3 stem without max-pool, stages of ``width`` x (1, 2, 4,
    8) channels (64 = the standard ResNet-18, as the paper's width factor)."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
    ]
    c_in = width
    for stage, stride in enumerate((1, 2, 2, 2)):
        c_out = width * 2**stage
        layers += [_Block(c_in, c_out, stride), _Block(c_out, c_out, 1)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, n_classes)]
    return nn.Sequential(*layers)


def augment(x: torch.Tensor) -> torch.Tensor:
    """A random crop of the 4-pixel zero-padded image and a random horizontal flip, drawn per
    image on the batch's device (the paper's code draws one crop and flip per batch)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy, dx = (torch.randint(0, 9, (n, 1), device=x.device) for _ in range(2))
    rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]
    index = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    crops = padded[index, channel, rows, cols]
    flip = torch.rand(n, 1, 1, 1, device=x.device) < 0.5
    return torch.where(flip, crops.flip(3), crops)


def train(config: dict[str, Any], data: CifarN, amp: bool) -> None:
    """One seed of one configuration: the paper's CIFAR-N loop with the reporter added."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = amp and device.type == "cuda"
    torch.manual_seed(config["seed"])
    # torch.tensor copies: the arrays Ray hands over are read-only
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (MEAN, STD))
    x = (torch.tensor(data.images, device=device).permute(0, 3, 1, 2) / 255 - mean) / std
    y = torch.tensor(data.labels, device=device)
    n_held = len(y) // 10  # 5k val and 5k test of the 50k images, as the paper's code
    sizes = [len(y) - 2 * n_held, n_held, n_held]
    (x_train, x_val, x_test), (y_train, y_val, y_test) = x.split(sizes), y.split(sizes)

    model = resnet18(config["width"], data.n_classes).to(device)
    # channels-last speeds up mixed-precision convolutions; torch's stubs omit the argument
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.SGD(
        model.parameters(),
        lr=config["lr"],
        momentum=config["momentum"],
        weight_decay=config["weight_decay"],
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config["epochs"])
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    reporter = pht.PostHocReporter(
        model,
        config,
        val=(x_val, y_val),  # also the inputs for SWA's BatchNorm statistics, as the paper
        test=(x_test, y_test),
        checkpoint={"optimizer": opt, "scheduler": sched, "scaler": scaler},
        eval_batch_size=1000,
    )
    for _ in range(reporter.epoch, config["epochs"]):
        model.train()
        total = torch.zeros((), device=device)
        for batch in torch.randperm(len(y_train), device=device).split(config["batch_size"]):
            with torch.autocast(device.type, enabled=amp):
                loss = F.cross_entropy(model(augment(x_train[batch])), y_train[batch])
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            total += loss.detach() * len(batch)
        sched.step()
        reporter.step({"train/loss": total / len(y_train), "lr": sched.get_last_lr()[0]})


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``minimum``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {value}")
        return value

    return parse


def _gpus(text: str) -> float:
    """An argparse type: GPUs per trial, as Ray takes them (a fraction, or whole GPUs)."""
    value = float(text)
    if not (0 <= value <= 1 or value.is_integer()):
        raise argparse.ArgumentTypeError(
            f"must be a fraction in [0, 1] or a whole number of GPUs, got {text}"
        )
    return value


def _positive(text: str) -> float:
    """An argparse type: a number > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line; ``--help`` works without torchvision."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", choices=list(cifar_n.LABEL_SETS), default="cifar10n")
    sets = "; ".join(f"{d}: {', '.join(names)}" for d, names in cifar_n.LABEL_SETS.items())
    p.add_argument("--label-set", help=f"default: the noisiest (listed first). {sets}")
    p.add_argument("--epochs", type=_at_least(1), default=100, help="%(default)s, as the paper")
    p.add_argument(
        "--configs", type=_at_least(1), default=4, help="configurations to try (%(default)s)"
    )
    p.add_argument(
        "--seeds",
        type=_at_least(1),
        default=4,
        help="seeds (ensemble members) per configuration (%(default)s; the paper: 8)",
    )
    p.add_argument(
        "--grace-period",
        type=_at_least(1),
        default=10,
        help="epochs before PostHocASHA's first rung (%(default)s)",
    )
    p.add_argument(
        "--gpus-per-trial",
        type=_gpus,
        default=1.0,
        help="%(default)s; a fraction shares a GPU: 0.25 runs 4 trials on each",
    )
    p.add_argument("--cpus-per-trial", type=_positive, default=2.0, help="%(default)s")
    p.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="mixed precision on GPUs, as the paper (default: on)",
    )
    p.add_argument("--data-dir", default="data/cifar", help="downloads go here (%(default)s)")
    p.add_argument("--storage", default="example_output", help="Tune storage (%(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> tune.ResultGrid:
    """Download, tune, then print the leaderboard and the naive vs post-hoc selection table."""
    cli = build_parser()
    args = cli.parse_args(argv)
    if args.grace_period > args.epochs:
        cli.error(f"--grace-period ({args.grace_period}) must be <= --epochs ({args.epochs})")
    try:
        space = cifar_n.resnet_space(args.dataset, args.label_set, epochs=args.epochs)
    except ValueError as e:
        cli.error(str(e))
    data = download(space["dataset"], space["label_set"], os.path.abspath(args.data_dir))

    search = pht.PostHocSearch(metric=METRIC, mode="min", n_seeds=args.seeds)
    asha = pht.PostHocASHA(
        metric=METRIC, mode="min", max_t=args.epochs, grace_period=args.grace_period
    )
    trainable = tune.with_resources(
        tune.with_parameters(train, data=data, amp=args.amp),
        {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial},
    )
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            search_alg=search, scheduler=asha, num_samples=args.configs * args.seeds
        ),
        run_config=tune.RunConfig(
            name=f"{args.dataset}_{space['label_set']}",
            storage_path=os.path.abspath(args.storage),
            callbacks=[pht.PostHocCallback(asha, search)],
            failure_config=tune.FailureConfig(max_failures=2),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        ),
    )
    results = tuner.fit()
    print(pht.leaderboard(results, metric=METRIC).to_string(index=False))
    print(pht.selection_table(results, over="configs+epochs").to_string())
    return results


if __name__ == "__main__":
    main()
