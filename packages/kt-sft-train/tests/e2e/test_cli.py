"""`kt-sft` end to end: the embedded default job (DESIGN.md §6 layer 4), --model/--data on a tiny
checkpoint, --resume, info, export and bench.

The default-job test runs the installed console script exactly as a user would (`kt-sft train`, no
arguments, in an empty directory). The other runs go through `kt_sft_train.app.cli.main` in-process with
one thread (the stand-in model is tiny; more threads only add contention on a shared CI box).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from factory import CHAT_TEMPLATE, make_job, reverse_records, write_jsonl
from kt_sft_train import KTConfig
from kt_sft_train.app.cli import main
from kt_sft_train.app.options import default_job_dir, load_job
from safetensors.torch import load_file

ONE_THREAD = ["--threads", "1", "--no-progress"]

# A process where kt-sft cannot be imported: plain transformers + PEFT load the base and the adapter and
# write the float64 logits (and the base's, adapter disabled) for the given batch.
VANILLA_CHILD = textwrap.dedent(
    """
    import importlib.abc, sys

    class RefuseKtSft(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ("kt_sft_train", "kt_sft_kernels"):
                raise ModuleNotFoundError(f"{name} is blocked in the vanilla process", name=name)
            return None

    sys.meta_path.insert(0, RefuseKtSft())
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, adapter_dir, batch_path, out_path = sys.argv[1:5]
    batch = torch.load(batch_path, weights_only=True)
    # grouped_mm has no float64 kernel: the eager experts loop computes the same thing.
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64, experts_implementation="eager")
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        tuned = model(**batch).logits
        with model.disable_adapter():
            plain = model(**batch).logits
    leaked = sorted(m for m in sys.modules if m.partition(".")[0] in ("kt_sft_train", "kt_sft_kernels"))
    torch.save({"tuned": tuned, "plain": plain, "leaked": leaked}, out_path)
    """
)


def vanilla_logits(base: Path, adapter: Path, batch: dict[str, torch.Tensor], work: Path) -> dict:
    batch_path, out_path = work / "batch.pt", work / "vanilla.pt"
    torch.save(batch, batch_path)
    result = subprocess.run(
        [sys.executable, "-I", "-c", VANILLA_CHILD, str(base), str(adapter), str(batch_path), str(out_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out_path, weights_only=True)


def kt_logits(
    base: Path, adapter: Path, batch: dict[str, torch.Tensor], backend: str, dtype: torch.dtype
) -> torch.Tensor:
    from kt_sft_train.adapters import load_adapter
    from kt_sft_train.model import load_kt_model

    model = load_kt_model(base, KTConfig(backend=backend, threads=1), dtype=dtype)
    model = load_adapter(model, adapter).eval()
    with torch.no_grad():  # load_kt_model puts the dense part on the GPU where there is one
        return model(**{k: v.to(model.device) for k, v in batch.items()}).logits.cpu()


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def heldout_batch(model_dir: Path, heldout: Path, count: int = 4) -> dict[str, torch.Tensor]:
    from kt_sft_train.app.data import Formatter, collate, read_jsonl
    from transformers import AutoTokenizer

    formatter = Formatter(AutoTokenizer.from_pretrained(model_dir))
    examples = [formatter.encode(r, 256) for r in read_jsonl(heldout)[:count]]
    batch = collate(examples, formatter.pad_token_id)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def assert_adapter_is_vanilla_peft(base: Path, adapter: Path, heldout: Path, work: Path) -> None:
    """PeftModel.from_pretrained on the plain HF model (kt-sft not importable) gives the KT model's logits."""
    batch = heldout_batch(base, heldout)
    vanilla = vanilla_logits(base, adapter, batch, work)
    assert vanilla["leaked"] == []
    lora_effect = relative(vanilla["tuned"], vanilla["plain"])
    assert lora_effect > 1e-3, "the trained adapter should change the logits"
    # The same math in float64 (reference experts): DESIGN.md §7's 1e-6, far below the adapter's effect,
    # so a mis-ordered expert LoRA layout cannot pass.
    reference = kt_logits(base, adapter, batch, "reference", torch.float64)
    assert relative(reference, vanilla["tuned"]) <= 1e-6
    # The kernels (bf16 expert arithmetic under a float32 model): §7's whole-model bound.
    kernels = kt_logits(base, adapter, batch, "kernels", torch.float32)
    assert relative(kernels, vanilla["tuned"]) <= 1e-2


def step_losses(metrics: Path) -> list[float]:
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r for r in records if r["event"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    return [r["loss"] for r in steps]


def kt_sft_command() -> list[str]:
    script = Path(sys.executable).with_name("kt-sft")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "kt_sft_train.app.cli"]


# -- the embedded default job ---------------------------------------------------------------------------


def test_default_job_end_to_end(tmp_path: Path) -> None:
    """`kt-sft train`, no arguments: loss falls to <= 0.6x, held-out accuracy rises, vanilla PEFT loads."""
    job = default_job_dir()
    if not (job / "train.jsonl").is_file():
        pytest.skip(f"the embedded default job is not built into this checkout yet ({job})")
    result = subprocess.run(
        [*kt_sft_command(), "train"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    (output,) = (tmp_path / "kt-sft-output").iterdir()  # a new run-YYYYMMDD-HHMMSS folder per run
    assert output.name.startswith("run-")
    print(result.stdout)

    losses = step_losses(output / "metrics.jsonl")
    tenth = max(1, len(losses) // 10)
    first, last = sum(losses[:tenth]) / tenth, sum(losses[-tenth:]) / tenth
    assert last <= 0.6 * first, (first, last)

    summary = json.loads((output / "summary.json").read_text())
    assert summary["first_10pct_loss"] == pytest.approx(first) and summary[
        "last_10pct_loss"
    ] == pytest.approx(last)
    assert summary["accuracy_after"] > summary["accuracy_before"], summary
    assert "held-out exact match" in result.stdout and "tokens/s" in result.stdout
    assert (output / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_adapter_is_vanilla_peft(load_job(job).model, output / "adapter", job / "heldout.jsonl", tmp_path)


@pytest.mark.parametrize("weight_dtype", ["int8", "int4"])
def test_default_job_learns_on_a_quantized_base(
    tmp_path: Path, weight_dtype: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kt-sft train --weight-dtype int8|int4`, embedded default: loss falls, held-out accuracy rises."""
    job = default_job_dir()
    if not (job / "train.jsonl").is_file():
        pytest.skip(f"the embedded default job is not built into this checkout yet ({job})")
    output = tmp_path / "out"
    assert main(["train", "--weight-dtype", weight_dtype, "--output", str(output), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert f"memory    experts base {weight_dtype}" in text
    estimated, actual = re.search(r"estimated (.+?), actual (.+?) on the host", text).groups()  # type: ignore[union-attr]
    assert estimated == actual
    losses = step_losses(output / "metrics.jsonl")
    tenth = max(1, len(losses) // 10)
    assert sum(losses[-tenth:]) <= 0.6 * sum(losses[:tenth])
    summary = json.loads((output / "summary.json").read_text())
    assert summary["accuracy_after"] > summary["accuracy_before"], summary
    assert json.loads((output / "run.json").read_text())["kt_config"]["weight_dtype"] == weight_dtype


# -- --model / --data on a tiny checkpoint --------------------------------------------------------------


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_job(tmp_path_factory.mktemp("stand_in"), seed=5)


def train_args(job: Path, output: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model", str(job / "model"),
        "--data", str(job / "train.jsonl"),
        "--heldout", str(job / "heldout.jsonl"),
        "--output", str(output),
        "--lora-r", "4",
        "--batch-size", "8",
        "--max-seq-len", "32",
        "--lr", "0.02",
        "--eval-max-new-tokens", "8",
        *ONE_THREAD,
        *extra,
    ]  # fmt: skip


def test_model_and_data_train_a_tiny_checkpoint(
    stand_in: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out"
    assert main(train_args(stand_in, output, "--steps", "16", "--lr-scheduler", "cosine")) == 0
    stdout = capsys.readouterr().out
    assert "experts   CPU (kernels/" in stdout and "held-out exact match" in stdout

    losses = step_losses(output / "metrics.jsonl")
    assert len(losses) == 16 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in records if r["event"] == "step")
    assert step["tokens"] > 0 and step["experts_cpu_s"] > 0 and step["step_time_s"] >= step["experts_cpu_s"]
    assert [r["phase"] for r in records if r["event"] == "eval"] == ["before", "after"]
    assert records[-1]["event"] == "summary"

    run = json.loads((output / "run.json").read_text())
    assert run["options"]["lora_r"] == 4 and run["kt_config"]["threads"] == 1
    config = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    # "attention": full module paths of the attention blocks (a leaf name would hit same-named Linears).
    assert {f"model.layers.{n}.self_attn.{p}_proj" for n in (0, 1) for p in "qkvo"} == set(
        config["target_modules"]
    )
    assert (output / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_adapter_is_vanilla_peft(
        stand_in / "model", output / "adapter", stand_in / "heldout.jsonl", tmp_path
    )


def test_quantized_cache_flag_writes_then_reads(
    stand_in: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--quantized-cache DIR`: the first run quantizes and writes, the next reads back (ADR 0604)."""
    cache = tmp_path / "cache"
    lines = []
    for run in ("first", "second"):
        args = train_args(stand_in, tmp_path / run, "--steps", "1", "--weight-dtype", "int8")
        assert main([*args, "--eval-limit", "1", "--quantized-cache", str(cache)]) == 0
        lines += [line for line in capsys.readouterr().out.splitlines() if line.startswith("cache ")]
        recorded = json.loads((tmp_path / run / "run.json").read_text())["kt_config"]
        assert recorded["quantized_cache"] == str(cache)
    assert [line.split(": ", 1)[1].split(" (")[0] for line in lines] == [
        "0 layer(s) read back, 2 quantized and written",
        "2 layer(s) read back, 0 quantized and written",
    ]


def test_messages_data_with_chat_template_and_yaml_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = make_job(tmp_path / "chat", seed=6, chat_template=CHAT_TEMPLATE)
    messages = [
        {
            "messages": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["completion"]},
            ]
        }
        for r in reverse_records(16, seed=7)
    ]
    write_jsonl(job / "train.jsonl", messages)
    config = tmp_path / "kt.yaml"
    config.write_text("kt:\n  backend: reference\ntrain:\n  steps: 3\n  lora-targets: experts\n")
    output = tmp_path / "out"
    assert main(train_args(job, output, "--config", str(config))) == 0
    assert "(chat template)" in capsys.readouterr().out
    run = json.loads((output / "run.json").read_text())
    assert run["kt_config"]["backend"] == "reference" and run["experts"] == "reference (PyTorch)"
    assert len(step_losses(output / "metrics.jsonl")) == 3
    config_json = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert not config_json["target_modules"] and config_json["target_parameters"]


# -- --resume -------------------------------------------------------------------------------------------


def adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "adapter_model.safetensors")


def test_resume_continues_exactly(stand_in: Path, tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(train_args(stand_in, straight, "--steps", "6", "--eval-limit", "1")) == 0

    # An interrupted run: trained to step 5 with a checkpoint at step 3, then lost its step-5 state.
    assert main(train_args(stand_in, resumed, "--steps", "5", "--save-every", "3", "--eval-limit", "1")) == 0
    shutil.rmtree(resumed / "checkpoints" / "step-000005")
    assert main(train_args(stand_in, resumed, "--steps", "6", "--resume", "--eval-limit", "1")) == 0

    assert step_losses(resumed / "metrics.jsonl") == step_losses(straight / "metrics.jsonl")
    expected, actual = adapter_tensors(straight / "adapter"), adapter_tensors(resumed / "adapter")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step-000003", "step-000006"]


def test_run_directory_guards(stand_in: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "out"
    assert main(train_args(stand_in, output, "--resume", "--steps", "2")) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(train_args(stand_in, output, "--steps", "2", "--eval-limit", "1")) == 0
    capsys.readouterr()
    assert main(train_args(stand_in, output, "--steps", "2")) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(train_args(stand_in, output, "--steps", "4", "--resume", "--lora-r", "8")) == 2
    assert "lora_r: 4 -> 8" in capsys.readouterr().err
    assert main(train_args(stand_in, output, "--steps", "2", "--resume")) == 2
    assert "at step 2, the run has 2 steps" in capsys.readouterr().err
    assert main(train_args(stand_in, output, "--steps", "1", "--overwrite", "--eval-limit", "1")) == 0
    assert len(step_losses(output / "metrics.jsonl")) == 1


def test_bad_arguments_are_reported_without_traceback(
    stand_in: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"text": "x"}\n')
    cases = [
        (["train", "--model", str(stand_in / "model"), "--data", str(bad)], f"{bad}:2"),
        (train_args(stand_in, tmp_path / "o1", "--lr", "-1"), "--lr must be a positive number"),
        (
            train_args(stand_in, tmp_path / "o2", "--steps", "2", "--epochs", "1"),
            "either --steps or --epochs",
        ),
        (["train", "--model", str(tmp_path), "--data", str(stand_in / "train.jsonl")], "config.json"),
        (["train", "--job", str(tmp_path / "nowhere")], "is not a directory"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


# -- info, export, bench --------------------------------------------------------------------------------


def test_info_reports_tiers_and_a_correct_fit_table(capsys: pytest.CaptureFixture[str]) -> None:
    import kt_sft_kernels
    from kt_sft_train.app.info import FAMILIES
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kernels"]["active_tier"] == kt_sft_kernels.active_isa()
    assert info["kernels"]["tiers"]["portable"] is True
    assert info["ram_total_gib"] > 0 and info["versions"]["torch"] == importlib.metadata.version("torch")
    assert [row["model"] for row in info["model_fit"]] == [f.name for f in FAMILIES]

    # The table's expert count for Qwen3-30B-A3B equals the parameters of a model built from its config.
    config = Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(config)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    total = sum(p.numel() for p in model.parameters())
    qwen = next(f for f in FAMILIES if f.name == "Qwen3-30B-A3B")
    assert qwen.expert_params == experts
    assert abs(qwen.total_params - total) / total < 0.01

    # bf16 experts: 2 bytes a parameter (+ the headroom rule); int8 about half, int4 about a quarter.
    row = next(r for r in info["model_fit"] if r["model"] == "Qwen3-30B-A3B")
    assert row["experts_bf16_gib"] * 1024**3 == 2 * experts
    assert 0.5 < row["experts_int8_gib"] / row["experts_bf16_gib"] < 0.52
    assert 0.25 < row["experts_int4_gib"] / row["experts_bf16_gib"] < 0.27

    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "kernel tier" in text and "Qwen3-30B-A3B" in text and "int4 need" in text


def test_info_model_estimates_the_expert_base_without_loading(capsys: pytest.CaptureFixture[str]) -> None:
    job = default_job_dir()
    if not (job / "model" / "config.json").is_file():
        pytest.skip(f"the embedded default job is not built into this checkout yet ({job})")
    assert main(["info", "--json", "--model", str(job / "model")]) == 0
    memory = json.loads(capsys.readouterr().out)["model_memory"]
    rows = {row["weight_dtype"]: row for row in memory["experts"]}
    # 2 MoE layers x 8 experts x 3 x 64 x 64 parameters (README of the default job).
    params = 2 * 8 * 3 * 64 * 64
    assert rows["bf16"]["experts_bytes"] == 2 * params
    # int8: one byte a weight + one fp32 scale per output row (2I + H rows per expert per layer).
    assert rows["int8"]["experts_bytes"] == params + 4 * 2 * 8 * (2 * 64 + 64)
    # int4: half a byte a weight + one fp32 scale per group (64 divides hidden and intermediate).
    assert rows["int4"]["group_size"] == 64
    assert rows["int4"]["experts_bytes"] == params // 2 + 4 * params // 64
    assert all(row["loadable"] for row in rows.values())
    assert main(["info", "--model", str(job / "model")]) == 0
    assert "int4 (groups of 64)" in capsys.readouterr().out


def test_export_merged_and_per_expert(
    stand_in: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    assert main(train_args(stand_in, run, "--steps", "3", "--eval-limit", "1")) == 0
    adapter, base = run / "adapter", stand_in / "model"

    batch = heldout_batch(base, stand_in / "heldout.jsonl")
    vanilla = vanilla_logits(base, adapter, batch, tmp_path)
    assert relative(vanilla["tuned"], vanilla["plain"]) > 1e-3

    def merged_logits(directory: Path) -> torch.Tensor:
        with torch.no_grad():
            merged = AutoModelForCausalLM.from_pretrained(
                directory, dtype=torch.float64, experts_implementation="eager"
            )
            return merged(**batch).logits

    # float32 output: W + ΔW with one float32 rounding per weight.
    exact = tmp_path / "merged_fp32"
    argv = ["export", "--adapter", str(adapter), "--model", str(base), "--out", str(exact), "--merge"]
    assert main([*argv, "--dtype", "fp32"]) == 0
    assert relative(merged_logits(exact), vanilla["tuned"]) <= 1e-5
    # The base's dtype (bf16) by default: one bf16 rounding per weight (2^-9 relative).
    stored = tmp_path / "merged_bf16"
    argv[argv.index(str(exact))] = str(stored)
    assert main(argv) == 0
    assert relative(merged_logits(stored), vanilla["tuned"]) <= 1e-2

    per_expert = tmp_path / "per_expert"
    assert main(["export", "--adapter", str(adapter), "--model", str(base), "--out", str(per_expert)]) == 0
    keys = adapter_tensors(per_expert).keys()
    layers, experts = 2, 8
    for projection in ("gate_proj", "up_proj", "down_proj"):
        assert sum(".experts." in k and f".{projection}.lora_A" in k for k in keys) == layers * experts
    assert main(["export", "--adapter", str(adapter), "--model", str(base), "--out", str(adapter)]) == 2
    assert "--out must differ" in capsys.readouterr().err


def test_bench_runs_the_packaged_layer_timing(capsys: pytest.CaptureFixture[str]) -> None:
    small = ["--tokens", "32", "--experts", "4", "--top-k", "2", "--hidden", "64", "--intermediate", "32",
             "--rank", "4", "--repeat", "1", "--threads", "1"]  # fmt: skip
    assert main(["bench", *small]) == 0
    out = capsys.readouterr().out
    import kt_sft_kernels as kk

    # What was measured, on what, with how many threads, under which load: before any figure.
    assert out.startswith("machine: ") and kk.cpu_features()["vendor"] in out
    assert f"kernel tier: {kk.active_isa()}" in out and f"variant {kk.kernel_variant()}" in out
    assert "threads: 1 for kt-sft and for PyTorch" in out and "vs PyTorch" in out
    assert f"kt-sft {kk.active_isa()}" in out and "PyTorch fp32 per-expert loop" in out
    # --full: one row per tier this host runs (avx512_bf16 once per kernel variant).
    assert main(["bench", *small, "--full", "--no-reference"]) == 0
    rows = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("kt-sft ")]
    tiers = [t for t in kk.isa_names() if kk.isa_supported(t)]
    variants = len(kk.kernel_variant_names()) if "avx512_bf16" in tiers else 1
    assert len(rows) == len(tiers) + variants - 1 and set(rows) == set(tiers)
    assert main(["bench", "--threads", "0"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err
    # The peer comparison is benchmarks/bench_moe.py in a checkout: the installed command never looks for it.
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--quick", "--shape", "qwen3"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --quick --shape qwen3" in capsys.readouterr().err
