"""Markdown tables from the JSON the benchmark scripts write (for docs/performance.md).

    python benchmarks/report.py docs/bench/linear_step.json [more.json ...]

Each table row is a variant: median ms [min–max] over the runs, ratios fp32/x and bf16/x (> 1:
faster than that baseline), and, where recorded, the bytes saved for backward.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds < 10 else f"{seconds * 1e3:.0f}"


def variant_table(variants: dict[str, dict[str, Any]]) -> str:
    fp32, bf16 = variants["fp32"]["median"], variants["bf16_autocast"]["median"]
    memory = any(v.get("saved_bytes") for v in variants.values())
    head = "| variant | ms [min–max] | fp32 / x | bf16 / x |" + (" saved for backward |" * memory)
    lines = [head, "|" + " --- |" * (4 + memory)]
    for name, t in variants.items():
        spread = f" [{_ms(t['min'])}–{_ms(t['max'])}]" if "min" in t else ""
        note = " (fell back to simulate)" if t.get("fell_back_to_simulate") else ""
        row = (
            f"| {name}{note} | {_ms(t['median'])}{spread} | {fp32 / t['median']:.2f} "
            f"| {bf16 / t['median']:.2f} |"
        )
        if memory:
            saved = t.get("saved_bytes")
            row += f" {saved / 2**20:.1f} MiB |" if saved else " – |"
        lines.append(row)
    return "\n".join(lines)


def quantizer_table(quantize: dict[str, dict[str, Any]]) -> str:
    psq = quantize["psq"]["median"]
    lines = ["| quantizer | ms [min–max] | / eager PSQ |", "| --- | --- | --- |"]
    for name, t in quantize.items():
        lines.append(
            f"| {name} | {_ms(t['median'])} [{_ms(t['min'])}–{_ms(t['max'])}] "
            f"| {t['median'] / psq:.2f} |"
        )
    return "\n".join(lines)


def report(path: Path) -> str:
    data = json.loads(path.read_text())
    env = data["environment"]
    out = [
        f"<!-- {path}: {env['cpu']} ({env['cpu_capability']}), {env['threads']} threads, "
        f"torch {env['torch']}, python {env['python']}, commit {env['commit']} -->"
    ]
    if "quantize" in data:
        out += [quantizer_table(data["quantize"]), "", variant_table(data["layer_step"])]
    for group in ("shapes", "layers", "models"):
        for name, entry in data.get(group, {}).items():
            variants = entry.get("variants", entry)
            out += ["", f"**{name}**", "", variant_table(variants)]
            if entry.get("breakdown_int8"):
                parts = ", ".join(_part(k, v) for k, v in entry["breakdown_int8"].items())
                out += ["", f"int8 step parts: {parts}"]
    return "\n".join(out)


def _part(key: str, value: float) -> str:
    """One of the int8 step's parts: seconds as ms, the bandwidth (bytes/s) as GB/s."""
    if key.endswith("bytes_per_s"):
        return f"{key.removesuffix('_bytes_per_s')} {value / 1e9:.1f} GB/s"
    return f"{key} {_ms(value)} ms"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("files", nargs="+", type=Path)
    for path in parser.parse_args().files:
        print(report(path), end="\n\n")


if __name__ == "__main__":
    main()
