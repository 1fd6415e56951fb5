"""Crash safety of a training run (issue 16, "what to build" 3): a writer SIGKILLed in the middle of a
checkpoint leaves the previous checkpoint intact, --resume continues from it bit for bit, and a checkpoint
is checked against the base model before the resume touches the model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from factory import make_job
from kt_sft_train.app.cli import main
from safetensors.torch import load_file

# The CLI in a child whose torch.save stops (sleeps) in the middle of writing step 2's optimizer state;
# a marker file tells the parent it is there, and the parent SIGKILLs it.
SLOW_SAVE_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch

    marker = Path(sys.argv[1])
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if "step-000002.staging" in str(f) and str(f).endswith("optimizer.pt"):
            with open(f, "r+b") as handle:
                handle.truncate(64)  # half written
            marker.write_text("in the middle of step 2")
            time.sleep(600)

    torch.save = save
    from kt_sft_train.app.cli import main
    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_job(tmp_path_factory.mktemp("job"), seed=21)


def args(job: Path, output: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", str(job / "model"), "--data", str(job / "train.jsonl"), "--output", str(output),
        "--threads", "1", "--no-progress", "--lora-r", "4", "--batch-size", "8", "--max-seq-len", "32",
        "--lr", "0.02", "--steps", "4", *extra,
    ]  # fmt: skip


def losses(output: Path) -> list[float]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["event"] == "step"]


def test_sigkill_mid_checkpoint_keeps_the_previous_one_and_resume_is_exact(job: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    assert main(args(job, straight)) == 0

    killed, marker = tmp_path / "killed", tmp_path / "marker"
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVE_CHILD, str(marker), *args(job, killed, "--save-every", "1")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert child.poll() is None, child.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the child never reached the checkpoint of step 2"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL

    checkpoints = killed / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith(".")) == ["step-000001"]
    assert [p for p in checkpoints.iterdir() if p.name.startswith(".step-000002.staging")]  # the torn write
    step1 = checkpoints / "step-000001"
    torch.load(step1 / "optimizer.pt", weights_only=True)  # intact
    load_file(step1 / "adapter" / "adapter_model.safetensors")

    assert main(["train", "--resume", "--output", str(killed), "--no-progress"]) == 0
    assert losses(killed) == losses(straight)
    expected = load_file(straight / "adapter" / "adapter_model.safetensors")
    actual = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)


def test_resume_onto_another_base_model_is_refused_before_it_is_touched(
    job: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out"
    assert main(args(job, output, "--steps", "2", "--save-every", "1")) == 0
    state = json.loads((output / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["base_model"]["experts"] == {"layers": 2, "experts": 8, "hidden": 64, "intermediate": 32}
    changed = tmp_path / "changed"
    shutil.copytree(job, changed)
    config_file = changed / "model" / "config.json"
    config = json.loads(config_file.read_text())
    config["rms_norm_eps"] = config["rms_norm_eps"] * 10  # same shapes, another model
    config_file.write_text(json.dumps(config))
    run_file = output / "run.json"
    run = json.loads(run_file.read_text())
    run["options"]["model"] = str(changed / "model")  # as if the files at the recorded path changed
    run_file.write_text(json.dumps(run))
    capsys.readouterr()
    assert main(["train", "--resume", "--output", str(output), "--steps", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "was trained on another base model (rms_norm_eps:" in err and "Traceback" not in err
