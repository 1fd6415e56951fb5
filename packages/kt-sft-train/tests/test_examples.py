"""The examples in examples/ run on a tiny KT model: transformers.Trainer and TRL's SFTTrainer, each a few
steps, saving a PEFT adapter with expert LoRA and reporting the CPU-experts time split."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from job_fixtures import make_job

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_job(tmp_path_factory.mktemp("examples_job"), seed=9)


def run_example(name: str, job: Path, output: Path) -> str:
    script = EXAMPLES / name
    if not script.is_file():
        pytest.skip(f"{script} is not here (tests run outside a source checkout)")
    argv = ["--model", str(job / "model"), "--data", str(job / "train.jsonl"), "--output", str(output)]
    argv += ["--max-steps", "3", "--batch-size", "4", "--threads", "1"]
    result = subprocess.run(
        [sys.executable, str(script), *argv],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def check_run(stdout: str, output: Path) -> None:
    config = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert (output / "adapter" / "adapter_model.safetensors").is_file()
    line = next(line for line in stdout.splitlines() if "mean step split:" in line)
    split = ast.literal_eval(line.split("mean step split:", 1)[1].strip())
    assert split["kt_experts_cpu_s"] > 0 and split["kt_step_time_s"] >= split["kt_experts_cpu_s"]


def test_trainer_example(job: Path, tmp_path: Path) -> None:
    check_run(run_example("train_with_trainer.py", job, tmp_path / "out"), tmp_path / "out")


def test_trl_sft_example(job: Path, tmp_path: Path) -> None:
    pytest.importorskip("trl", reason="TRL is in kt-sft-train's test extra; install it to run this example")
    check_run(run_example("train_with_trl.py", job, tmp_path / "out"), tmp_path / "out")
