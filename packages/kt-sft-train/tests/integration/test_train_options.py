"""Options of `kt-sft train` added for issue 16: --lora-dropout (dense LoRA only), --report-to, and
--no-progress silencing transformers' loading bar."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from factory import REFERENCE, batch, build_model, make_job, moe_config, randomize_lora
from kt_sft_train import kt_lora_config, wrap_moe_layers_with_kt_wrapper
from kt_sft_train.app.cli import main
from kt_sft_train.app.model_setup import apply_dense_lora_dropout
from kt_sft_train.app.options import OptionsError
from kt_sft_train.app.reporting import check_available
from torch import nn


def test_lora_dropout_reaches_the_dense_lora_only() -> None:
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    model = build_model(moe_config("qwen3_moe"), seed=4)
    wrap_moe_layers_with_kt_wrapper(model, REFERENCE)
    peft_model = get_peft_model(model, kt_lora_config(model, r=4))
    randomize_lora(peft_model)
    count = apply_dense_lora_dropout(peft_model, 0.5)
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    dense = [m for m in layers if isinstance(m.get_base_layer(), nn.Linear)]
    assert count == len(dense) > 0 and len(layers) > len(dense)  # the experts' wrappers exist, untouched
    for module in layers:
        dropout = module.lora_dropout["default"]
        if module in dense:
            assert isinstance(dropout, nn.Dropout) and dropout.p == 0.5
        else:
            assert isinstance(dropout, nn.Identity)
    ids = batch(seed=5)
    peft_model.train()
    torch.manual_seed(0)
    first = peft_model(ids).logits
    second = peft_model(ids).logits
    assert not torch.equal(first, second)  # dropout acts in training
    peft_model.eval()
    assert torch.equal(peft_model(ids).logits, peft_model(ids).logits)


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_job(tmp_path_factory.mktemp("job"), seed=13)


def train(job: Path, output: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", str(job / "model"), "--data", str(job / "train.jsonl"), "--output", str(output),
        "--threads", "1", "--max-seq-len", "32", "--batch-size", "8", "--lora-r", "4", *extra,
    ]  # fmt: skip


def test_lora_dropout_trains_and_saves_a_loadable_config(
    job: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out"
    assert main(train(job, output, "--steps", "2", "--lora-dropout", "0.1", "--no-progress")) == 0
    config = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert config["lora_dropout"] == 0.0  # PEFT rejects a nonzero one on the expert parameter targets
    assert json.loads((output / "run.json").read_text())["options"]["lora_dropout"] == 0.1
    assert main(train(job, tmp_path / "o2", "--lora-dropout", "1.5")) == 2
    assert "--lora-dropout must be in [0, 1)" in capsys.readouterr().err
    argv = train(job, tmp_path / "o3", "--lora-dropout", "0.1", "--lora-targets", "experts", "--steps", "1")
    assert main(argv) == 2
    assert "--lora-dropout needs attention/dense LoRA targets" in capsys.readouterr().err


def test_no_progress_silences_the_weight_loading_bar(
    job: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(train(job, tmp_path / "quiet", "--steps", "1", "--no-progress")) == 0
    assert "Loading weights" not in capsys.readouterr().err
    assert main(train(job, tmp_path / "loud", "--steps", "1")) == 0
    assert "Loading weights" in capsys.readouterr().err  # the bar exists: the check above can fail


@pytest.mark.parametrize("target", ["tensorboard", "wandb", "mlflow"])
def test_report_to_needs_its_library(target: str, job: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    if importlib.util.find_spec(target) is not None:
        check_available(target)
        return
    with pytest.raises(OptionsError, match=f"--report-to {target} needs the '{target}' package"):
        check_available(target)
    assert main(train(job, tmp_path / "out", "--report-to", target)) == 2
    err = capsys.readouterr().err
    assert f"pip install {target}" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before anything was created or loaded


def test_report_to_rejects_unknown_targets(job: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(train(job, tmp_path / "out", "--report-to", "tensorbored")) == 2
    assert "--report-to must be a comma list of ['none', 'tensorboard'" in capsys.readouterr().err
    assert main(train(job, tmp_path / "out", "--report-to", "none", "--steps", "1", "--no-progress")) == 0


def test_report_to_tensorboard_writes_events(job: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    output = tmp_path / "out"
    assert main(train(job, output, "--steps", "2", "--report-to", "tensorboard", "--no-progress")) == 0
    assert list((output / "tensorboard").glob("events.out.tfevents.*"))
