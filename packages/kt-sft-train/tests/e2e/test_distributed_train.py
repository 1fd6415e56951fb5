"""`kt-sft train` with 2 ranks (torchrun-like environment, CPU, gloo) vs 1 process on the same job.

The 2-rank run splits each global batch over the ranks (one expert owner); its per-step losses follow
the single-process run, only rank 0 writes files, and --resume continues it exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from factory import make_job
from safetensors.torch import load_file

RUN_LIMIT_S = 300


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def train(job: Path, output: Path, world: int, *extra: str) -> None:
    args = [sys.executable, "-m", "kt_sft_train.app.cli", "train", "--model", str(job / "model")]
    args += [
        "--data",
        str(job / "train.jsonl"),
        "--heldout",
        str(job / "heldout.jsonl"),
        "--output",
        str(output),
    ]
    args += ["--lora-r", "4", "--batch-size", "4", "--max-seq-len", "32", "--lr", "0.02", "--dtype", "fp32"]
    args += ["--backend", "reference", "--eval-limit", "1", "--eval-max-new-tokens", "4", "--threads", "1"]
    args += ["--no-progress", "--steps", "3", *extra]
    port = _free_port()
    processes = []
    for rank in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if world > 1:
            env.update(
                RANK=str(rank),
                WORLD_SIZE=str(world),
                LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE=str(world),
                GROUP_RANK="0",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
        log = open(output.parent / f"{output.name}-rank{rank}.log", "w")  # noqa: SIM115  closed below
        processes.append((subprocess.Popen(args, env=env, stdout=log, stderr=log), log))
    try:
        for process, _ in processes:
            process.wait(timeout=RUN_LIMIT_S)
    except subprocess.TimeoutExpired:
        for process, _ in processes:
            process.kill()
        pytest.fail(f"kt-sft train with {world} ranks did not finish within {RUN_LIMIT_S} s")
    finally:
        for _, log in processes:
            log.close()
    for rank, (process, _) in enumerate(processes):
        log = (output.parent / f"{output.name}-rank{rank}.log").read_text()
        assert process.returncode == 0, f"rank {rank}:\n{log[-4000:]}"


def step_losses(output: Path) -> list[float]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["event"] == "step"]


def test_two_ranks_follow_one_process_and_resume_exactly(tmp_path: Path) -> None:
    job = make_job(tmp_path / "job", seed=5)
    single, straight, resumed = tmp_path / "single", tmp_path / "straight", tmp_path / "resumed"
    train(job, single, 1)
    train(job, straight, 2, "--save-every", "2")
    # Only rank 0 wrote: one adapter, one metrics file, no stray files of rank 1 in the output.
    assert (straight / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    expected, actual = step_losses(single), step_losses(straight)
    assert len(actual) == 3
    # float32 dense part; the batches are split differently, so sums round differently.
    for got, want in zip(actual, expected, strict=True):
        assert abs(got - want) <= 1e-4 * abs(want), (actual, expected)

    # An interrupted distributed run: its step-3 state lost, resumed from the step-2 checkpoint.
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000003")
    train(job, resumed, 2, "--save-every", "2", "--resume")
    assert step_losses(resumed) == step_losses(straight)
    want, got = (
        load_file(straight / "adapter" / "adapter_model.safetensors"),
        load_file(resumed / "adapter" / "adapter_model.safetensors"),
    )
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
