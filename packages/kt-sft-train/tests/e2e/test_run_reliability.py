"""What a new user meets around a run (issue 16): the working directory, running twice, Ctrl-C and
--resume, unwritable --output, file modes, failed runs, NaN/Inf, and the help text.

Every run is the tiny stand-in job on one thread (seconds); the Ctrl-C tests run the CLI in a child process
and send it a real SIGINT.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from factory import make_job, write_jsonl
from kt_sft_train.app.cli import build_parser, main
from kt_sft_train.app.options import OptionsError
from kt_sft_train.app.outputs import check_writable
from safetensors.torch import load_file, save_file

FAST = ["--threads", "1", "--no-progress", "--eval-limit", "1", "--eval-max-new-tokens", "4"]


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_job(tmp_path_factory.mktemp("job"), seed=11)


def args(job: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", str(job / "model"), "--data", str(job / "train.jsonl"),
        "--heldout", str(job / "heldout.jsonl"), "--lora-r", "4", "--batch-size", "8",
        "--max-seq-len", "32", "--lr", "0.02", *FAST, *extra,
    ]  # fmt: skip


def step_losses(output: Path) -> list[float]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["event"] == "step"]


def adapter(output: Path) -> dict[str, torch.Tensor]:
    return load_file(output / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(a: Path, b: Path) -> None:
    first, second = adapter(a), adapter(b)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


# -- 1, 2: the working directory and running twice ------------------------------------------------------


def test_runs_without_output_get_new_folders_and_ignore_a_previous_run(
    job: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README order: the main job writes ./kt-sft-output, then the tests (and a second run) work."""
    assert Path.cwd() == tmp_path  # conftest's autouse fixture: no test sees the real working directory
    previous = tmp_path / "kt-sft-output"
    (previous / "adapter").mkdir(parents=True)  # what an older kt-sft left at the top level
    (previous / "run.json").write_text("{}")
    assert main(args(job, "--steps", "1")) == 0
    assert main(args(job, "--steps", "1")) == 0
    runs = sorted(p for p in previous.iterdir() if p.name.startswith("run-"))
    assert len(runs) == 2 and all((run / "adapter" / "adapter_config.json").is_file() for run in runs)
    out = capsys.readouterr().out
    assert all(f"output    {run.relative_to(tmp_path)}\n" in out for run in runs)
    # A CLI error case that runs without --output gives the same one-line error as in an empty directory.
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": 1, "completion": 2}])
    assert main(["train", "--model", str(job / "model"), "--data", str(bad), *FAST]) == 2
    err = capsys.readouterr().err
    assert "'prompt' is int, 'completion' is int" in err and "Traceback" not in err
    assert len(list(previous.iterdir())) == 4  # adapter, run.json, the two runs: the failed run left nothing


def test_a_failed_run_leaves_no_empty_output_folder(
    job: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "x"}])
    output = tmp_path / "new" / "run"
    assert main(["train", "--model", str(job / "model"), "--data", str(bad), "--output", str(output)]) == 2
    assert "got keys ['text']" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


# -- 4: unwritable --output -----------------------------------------------------------------------------


def test_unwritable_output_is_refused_before_loading(
    job: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    # Fails for every user, root included: a folder cannot be created under a regular file.
    assert main(args(job, "--output", str(a_file / "run"))) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "--output" in captured.err and "under the file" in captured.err
    assert "model " not in captured.out  # refused before the model loaded
    # /proc takes no new files, not even from root.
    with pytest.raises(OptionsError, match="--output '/proc/kt-sft-run' is not writable"):
        check_writable(Path("/proc/kt-sft-run"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits (the file cases above apply)")
def test_read_only_output_folder_is_refused(
    job: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert main(args(job, "--output", str(locked / "run"))) == 2
        assert "is not writable" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


# -- 5: file modes follow the umask ---------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_follow_the_umask(umask: int, tmp_path: Path) -> None:
    from kt_sft_train.adapters import atomic_directory

    previous = os.umask(umask)
    try:
        with atomic_directory(tmp_path / "saved") as staging:
            save_file({"w": torch.ones(2)}, staging / "weights.safetensors")
            (staging / "inner").mkdir()
            torch.save({}, staging / "inner" / "state.pt")
    finally:
        os.umask(previous)
    for path in [tmp_path / "saved", *(tmp_path / "saved").rglob("*")]:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


def test_run_outputs_are_readable_like_their_json(job: Path, tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        assert main(args(job, "--output", str(tmp_path / "out"), "--steps", "2", "--save-every", "1")) == 0
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files) and any(p.name == "optimizer.pt" for p in files)
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


# -- 6: help text ---------------------------------------------------------------------------------------


def test_every_option_has_help_and_shows_its_default() -> None:
    from kt_sft_train.app.options import TrainOptions

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help text"
            field = TrainOptions.__dataclass_fields__.get(action.dest)
            has_default = field is not None and field.default not in (None, False, True)
            if name == "bench" and action.default is not None and not isinstance(action.default, bool):
                has_default = True
            if has_default:
                text = sub.format_help().replace("\n", " ")
                assert "default" in action.help or sub.formatter_class.__name__.startswith("ArgumentDefaults")
                assert action.option_strings[0] in text


# -- 3 and "exact resume": Ctrl-C, --resume alone ------------------------------------------------------


def run_cli_child(argv: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "kt_sft_train.app.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for_steps(output: Path, count: int, child: subprocess.Popen[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = output / "metrics.jsonl"
        if metrics.is_file() and len(step_losses(output)) >= count:
            return
        assert child.poll() is None, child.communicate()
        time.sleep(0.05)
    child.kill()
    pytest.fail("the child did not reach the step")


def test_ctrl_c_saves_a_checkpoint_and_resume_alone_continues_exactly(job: Path, tmp_path: Path) -> None:
    steps = 40
    straight = tmp_path / "straight"
    assert main(args(job, "--output", str(straight), "--steps", str(steps))) == 0

    interrupted = tmp_path / "interrupted"
    child = run_cli_child(args(job, "--output", str(interrupted), "--steps", str(steps)))
    wait_for_steps(interrupted, 2, child)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    assert "Traceback" not in err
    checkpoints = sorted((interrupted / "checkpoints").iterdir())
    assert len(checkpoints) == 1, checkpoints
    stopped_at = int(checkpoints[0].name.removeprefix("step-"))
    assert 2 <= stopped_at < steps
    assert f"--resume --output {interrupted}" in err

    # --resume alone: model, data, steps, LoRA shape... come from run.json.
    assert main(["train", "--resume", "--output", str(interrupted), "--no-progress"]) == 0
    assert step_losses(interrupted) == step_losses(straight)
    assert_same_adapter(straight, interrupted)


def test_resume_refuses_conflicting_flags_by_name(
    job: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out"
    assert main(args(job, "--output", str(output), "--steps", "3", "--save-every", "1")) == 0
    capsys.readouterr()
    argv = ["train", "--resume", "--output", str(output), "--lora-r", "8", "--seed", "3"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "lora_r: 4 -> 8" in err and "seed: 0 -> 3" in err and "drop --lora-r --seed" in err


def test_ctrl_c_before_any_checkpoint_does_not_mention_resume(tmp_path: Path) -> None:
    from kt_sft_train.app.cli import interrupted_message
    from kt_sft_train.app.training import TrainingInterrupted

    assert "--resume" not in interrupted_message(TrainingInterrupted(tmp_path, None))
    assert "--resume" not in interrupted_message(KeyboardInterrupt())
    text = interrupted_message(TrainingInterrupted(tmp_path, tmp_path / "checkpoints" / "step-000004"))
    assert f"--resume --output {tmp_path}" in text and "step-000004" in text


def test_periodic_checkpoints_by_time(job: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    extra = ("--steps", "4", "--save-every-minutes", "1e-9", "--keep-checkpoints", "10")
    assert main(args(job, "--output", str(output), *extra)) == 0
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == [
        f"step-{n:06d}" for n in range(1, 5)
    ]


# -- "what to build" 2: NaN/Inf -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def poisoned_job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stand-in job with one NaN in layer 1's attention output projection."""
    directory = make_job(tmp_path_factory.mktemp("poisoned"), seed=12)
    weights_file = directory / "model" / "model.safetensors"
    tensors = load_file(weights_file)
    key = "model.layers.1.self_attn.o_proj.weight"
    tensors[key][3, 5] = float("nan")
    save_file(tensors, weights_file, metadata={"format": "pt"})
    return directory


def test_a_non_finite_loss_stops_naming_the_layer(
    poisoned_job: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args(poisoned_job, "--output", str(tmp_path / "out"), "--steps", "2")) == 2
    err = capsys.readouterr().err
    assert "non-finite at step 1" in err and "model.layers.1.self_attn.o_proj" in err, err
    assert "--skip-nonfinite-steps" in err and "Traceback" not in err


def test_skip_nonfinite_steps_skips_and_records(poisoned_job: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    assert main(args(poisoned_job, "--output", str(output), "--steps", "2", "--skip-nonfinite-steps")) == 0
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if r["event"] == "skipped"]
    assert [r["step"] for r in skipped] == [1, 2] and "self_attn.o_proj" in skipped[0]["reason"]


def test_first_nonfinite_gradient_names_the_parameter() -> None:
    from kt_sft_train.app.nonfinite import first_nonfinite_gradient

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    model(torch.randn(2, 3)).sum().backward()
    assert first_nonfinite_gradient(model) is None
    model[1].weight.grad[0, 1] = float("inf")
    assert first_nonfinite_gradient(model) == "1.weight"


# -- 6: Ctrl-C while the heavy libraries import ---------------------------------------------------------

CTRL_C_DURING_IMPORTS = """
import importlib.abc, sys

class CtrlCOnTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt  # what a Ctrl-C while torch loads raises
        return None

sys.meta_path.insert(0, CtrlCOnTorch())
from kt_sft_launcher import main
sys.exit(main())
"""


def test_ctrl_c_during_imports_prints_one_line() -> None:
    import tomllib

    pyproject = Path(__file__).parents[2] / "pyproject.toml"
    scripts = tomllib.loads(pyproject.read_text())["project"]["scripts"]
    assert scripts["kt-sft"] == "kt_sft_launcher:main"
    result = subprocess.run(
        [sys.executable, "-c", CTRL_C_DURING_IMPORTS, "train"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 130
    assert result.stderr == "kt-sft: interrupted while starting (nothing was written)\n", result.stderr
