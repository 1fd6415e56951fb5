"""Bounded memory of a training run (issue 16, "what to build" 5): the resident memory of `kt-sft train`
stays flat over 250 optimizer steps of the tiny model once warmed up. The CLI logs `rss_mib` per step in
metrics.jsonl; the run is a child process so nothing else of the test session moves its memory."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from factory import make_job

STEPS = 250
WARM_UP = 50
# A leak of one step's activations (batch 4 x 24 tokens x hidden 64 in float32: 24 KiB per tensor, dozens
# per step) or of an autograd graph per step grows RSS by far more than this over the 200 measured steps.
GROWTH_BOUND_MIB = 4.0


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="rss_mib is read from /proc")
def test_rss_is_flat_over_200_training_steps(tmp_path: Path) -> None:
    job = make_job(tmp_path / "job", seed=31)
    output = tmp_path / "out"
    argv = [
        "train", "--model", str(job / "model"), "--data", str(job / "train.jsonl"), "--output", str(output),
        "--threads", "1", "--no-progress", "--lora-r", "4", "--batch-size", "4", "--max-seq-len", "24",
        "--steps", str(STEPS), "--lr", "0.005", "--save-every-minutes", "0",
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "kt_sft_train.app.cli", *argv],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    rss = [r["rss_mib"] for r in records if r["event"] == "step"]
    assert len(rss) == STEPS and all(value > 0 for value in rss)
    start = statistics.median(rss[WARM_UP : WARM_UP + 20])
    end = statistics.median(rss[-20:])
    print(f"rss after warm-up {start:.1f} MiB, at the end {end:.1f} MiB, max {max(rss[WARM_UP:]):.1f}")
    assert end - start < GROWTH_BOUND_MIB, (start, end)
    assert max(rss[WARM_UP:]) - start < 2 * GROWTH_BOUND_MIB, rss[WARM_UP:]
