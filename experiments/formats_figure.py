"""Quantization variance against bits per element, integer quantizers and floating-point formats.

    python experiments/formats_figure.py DIR [DIR ...] --out docs/figures/formats_variance.png

Each DIR holds a ``variance.json`` of ``fqtorch variance`` (docs/results.md names the commands).
Integer quantizers are lines over their bit widths; each format is one point at its bits per
element (element bits plus its block scale's share). The y axis is the quantization variance over
the sampling variance of the same measurement; hollow markers fail the bias test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

INTEGER = ("ptq", "psq", "bhq", "rht")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    fig, axes = plt.subplots(1, len(args.dirs), figsize=(5.6 * len(args.dirs), 4.4), squeeze=False)
    for ax, folder in zip(axes[0], args.dirs, strict=True):
        data = json.loads((folder / "variance.json").read_text())
        sampling = data["sampling_variance"]
        results = data["results"]
        for i, name in enumerate(INTEGER):
            rows = sorted((r for r in results if r["quantizer"] == name), key=lambda r: r["bits"])
            if rows:
                ax.plot([r["bits_per_element"] for r in rows],
                        [r["quantization_variance"] / sampling for r in rows],
                        "-o", color=f"C{i}", label=name.upper())  # fmt: skip
        formats = [r for r in results if r["quantizer"].partition("+")[0] not in INTEGER]
        for j, r in enumerate(formats):
            passed = r.get("bias_passed", r["bias_z_rms"] <= r["bias_z_limit"])
            ax.scatter(r["bits_per_element"], r["quantization_variance"] / sampling, s=60,
                       marker="sDv^<>P*Xh"[j % 10], color=f"C{(j + 4) % 10}",
                       facecolors=f"C{(j + 4) % 10}" if passed else "none",
                       label=r["quantizer"] + ("" if passed else " (fails bias test)"))  # fmt: skip
        ax.axhline(1.0, color="k", ls="--", lw=1, label="= sampling variance")
        ax.set_yscale("log")
        ax.set_xlabel("bits per element of grad_output (formats: + block-scale share)")
        ax.set_ylabel("quantization variance / sampling variance")
        ax.set_title(f"{data['model']} on {data['dataset']} (trained), batch {data['batch_size']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
