"""CIFAR-10-N / CIFAR-100-N ResNet-18 space: the paper's CIFAR-N setting, searched around it.

Sources (see ``docs/sources.md``). The fixed values and the centre of each range are the
paper's code defaults (rishabh-ranjan/post-hoc-reversal ``src/expt/cifar.py``, confirmed by the
run arguments saved in its ``nbs/cifar.ipynb``): SGD with momentum 0.9, lr 0.1, weight decay
5e-4, cosine schedule to 0 stepped per epoch, 100 epochs, batch size 500, ResNet-18 base width
64 (the authors' timm fork's ``width_factor``: stages of w, 2w, 4w, 8w channels); data: the 50k
CIFAR training images split 40k/5k/5k in index order, train, val and test all carrying the
chosen CIFAR-N label set. The label-set names are those of ``cifar.py`` (``worst``,
``aggregate``, ``random1`` ...); for CIFAR-100-N we add the fine/coarse suffix, since the code
supports both and which one the paper used is not known.

Our choices: the ranges searched (lr log-uniform in [0.02, 0.5], weight decay log-uniform in
[1e-4, 2e-3], width in {32, 64, 128}: a secondary summary of the paper's figures describes
reversal across ResNet widths on C-10-N Worst, but which widths it swept is not known), and the
default label sets, the noisiest ones (``worst``, ``noisy_fine``): the paper's abstract finds
reversal especially prominent with high label noise. The paper fine-tunes an
ImageNet-pretrained timm ``resnet18d``; ``examples/cifar10n.py`` trains a CIFAR ResNet-18 (3x3
stem, no max-pool) from scratch, so its numbers are not the paper's.

Noise rates of the label sets over the 50k images (computed by the project from the CIFAR-N
label files; per split in ``docs/sources.md``): clean 0%, aggregate 9.0%, random1 17.2%, random2
18.1%, random3 17.6%, worst 40.2%; CIFAR-100-N noisy_fine 40.2%, noisy_coarse 26.4%. The
paper's Figure 1 ensembles 8 runs per configuration; PostHocSearch(n_seeds=...) or
``posthoc_tune.with_seeds`` adds them.
"""

from __future__ import annotations

from typing import Any

from ray import tune

from search_spaces._checks import check_choice, check_epochs

# label set -> key in the CIFAR-N label file (github.com/UCSC-REAL/cifar-10-100n, data/*.pt)
LABEL_FILE_KEYS: dict[str, dict[str, str]] = {
    "cifar10n": {
        "worst": "worse_label",
        "aggregate": "aggre_label",
        "random1": "random_label1",
        "random2": "random_label2",
        "random3": "random_label3",
        "clean": "clean_label",
    },
    "cifar100n": {
        "noisy_fine": "noisy_label",
        "clean_fine": "clean_label",
        "noisy_coarse": "noisy_coarse_label",
        "clean_coarse": "clean_coarse_label",
    },
}
LABEL_SETS: dict[str, tuple[str, ...]] = {d: tuple(k) for d, k in LABEL_FILE_KEYS.items()}


def n_classes(dataset: str, label_set: str) -> int:
    """10 for CIFAR-10-N, 100 for CIFAR-100-N fine labels, 20 for its coarse labels."""
    check_choice("label_set", label_set, LABEL_SETS[check_choice("dataset", dataset, LABEL_SETS)])
    if dataset == "cifar10n":
        return 10
    return 20 if label_set.endswith("_coarse") else 100


def resnet_space(
    dataset: str = "cifar10n", label_set: str | None = None, epochs: int = 100
) -> dict[str, Any]:
    """lr log-uniform in [0.02, 0.5], weight decay log-uniform in [1e-4, 2e-3], width in
    {32, 64, 128}; SGD momentum 0.9, batch size 500, ``epochs`` epochs (cosine schedule).

    ``dataset`` is ``"cifar10n"`` or ``"cifar100n"``; ``label_set`` one of
    ``LABEL_SETS[dataset]``, by default the noisiest (``"worst"`` / ``"noisy_fine"``).
    """
    sets = LABEL_SETS[check_choice("dataset", dataset, LABEL_SETS)]
    return {
        "dataset": dataset,
        "label_set": sets[0] if label_set is None else check_choice("label_set", label_set, sets),
        "lr": tune.loguniform(0.02, 0.5),
        "weight_decay": tune.loguniform(1e-4, 2e-3),
        "width": tune.choice([32, 64, 128]),
        "momentum": 0.9,
        "batch_size": 500,
        "epochs": check_epochs(epochs),
    }
