"""Write one YAML config per run of the paper's experiments (docs/method.md §6).

    python experiments/make_configs.py      # rewrites experiments/{cifar10,imagenet}/*.yaml

Each run: exact (no quantization), QAT (8-bit forward, exact backward), and PTQ / PSQ / BHQ
gradients at 4..8 bits on the activation-gradient GEMM (8-bit weight-gradient branch).
The data location is not part of a config: pass --data-dir.
"""

from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent

RECIPES = {
    ("cifar10", "preact_resnet56"): {
        "dataset": "cifar10", "model": "preact_resnet56", "epochs": 200, "batch_size": 128,
        "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "warmup_epochs": 0.0,
        "label_smoothing": 0.0, "optimizer": "sgd",
    },
    ("imagenet", "resnet18"): {
        "dataset": "imagenet", "model": "resnet18", "epochs": 90, "batch_size": 50,
        "lr": 0.4, "momentum": 0.875, "weight_decay": 2**-15, "warmup_epochs": 4.0,
        "label_smoothing": 0.1, "optimizer": "sgd",
    },
    ("imagenet", "resnet50"): {
        "dataset": "imagenet", "model": "resnet50", "epochs": 90, "batch_size": 50,
        "lr": 0.4, "momentum": 0.875, "weight_decay": 2**-15, "warmup_epochs": 4.0,
        "label_smoothing": 0.1, "optimizer": "sgd",
    },
}  # fmt: skip

PRESETS = ["exact", "qat"] + [f"{q}{b}" for q in ("ptq", "psq", "bhq") for b in range(4, 9)]


def main() -> None:
    count = 0
    for (dataset, model), recipe in RECIPES.items():
        folder = HERE / dataset
        folder.mkdir(exist_ok=True)
        for preset in PRESETS:
            name = f"{model}_{preset}"
            config = {**recipe, "preset": preset, "seed": 0, "out": f"runs/{dataset}/{name}"}
            header = f"# {dataset} {model}, {preset} (docs/method.md §6), by make_configs.py\n"
            (folder / f"{name}.yaml").write_text(header + yaml.safe_dump(config, sort_keys=False))
            count += 1
    print(f"wrote {count} configs under {HERE}")


if __name__ == "__main__":
    main()
