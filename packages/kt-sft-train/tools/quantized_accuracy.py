"""The accuracy contract of quantized expert bases (issue 11): `kt-sft train` on the embedded default job
with --weight-dtype bf16, int8 and int4; prints a Markdown table of held-out exact match before/after and
writes the three loss curves into one PNG.

    python packages/kt-sft-train/tools/quantized_accuracy.py --out /tmp/quant-runs \
        --plot docs/img/quantized_default_job_loss.png [--steps 25]

Run from the repository root with kt_sft_train importable (source devtools' dev.sh, or an install).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

WEIGHT_DTYPES = ("bf16", "int8", "int4")
COLORS = {"bf16": "#1f4e8c", "int8": "#d9822b", "int4": "#3a9a4a"}


def run(weight_dtype: str, output: Path, steps: int | None) -> dict:
    command = [sys.executable, "-m", "kt_sft_train.app.cli", "train", "--weight-dtype", weight_dtype]
    command += ["--output", str(output), "--no-progress"]
    if steps is not None:
        command += ["--steps", str(steps)]
    subprocess.run(command, check=True)
    summary = json.loads((output / "summary.json").read_text())
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    summary["curve"] = [(r["step"], r["loss"]) for r in records if r.get("event") == "step"]
    return summary


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    for weight_dtype, summary in results.items():
        steps, losses = zip(*summary["curve"], strict=True)
        axes.plot(steps, losses, color=COLORS[weight_dtype], linewidth=1.5, label=f"{weight_dtype} base")
    axes.set_yscale("log")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("training loss")
    axes.set_title(title, fontsize=11)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the three runs")
    parser.add_argument("--plot", type=Path, required=True, help="PNG of the three loss curves")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the job's)")
    args = parser.parse_args()
    results = {d: run(d, args.out / d, args.steps) for d in WEIGHT_DTYPES}
    steps = results["bf16"]["steps"]
    plot(results, args.plot, f"kt-sft train, embedded default job, {steps} steps: expert base dtype")
    print("| expert base | held-out before | held-out after | loss first 10% | loss last 10% |")
    print("|---|---|---|---|---|")
    for weight_dtype, s in results.items():
        print(
            f"| {weight_dtype} | {100 * s['accuracy_before']:.1f}% | {100 * s['accuracy_after']:.1f}% | "
            f"{s['first_10pct_loss']:.4f} | {s['last_10pct_loss']:.4f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
