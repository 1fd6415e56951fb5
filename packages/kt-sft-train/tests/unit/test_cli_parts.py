"""The pieces under `kt-sft train`: record formatting and label masks, the batch order, option precedence,
the learning-rate schedule and the step-time split (no training run here; see test_cli.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from factory import CHAT_TEMPLATE, char_tokenizer, make_job, write_jsonl
from kt_sft_train import KTConfig, KTConfigError
from kt_sft_train.app.data import (
    IGNORE_INDEX,
    BatchSchedule,
    DataError,
    Formatter,
    collate,
    read_jsonl,
    tokenize_records,
)
from kt_sft_train.app.metrics import decile_means
from kt_sft_train.app.options import ConfigFile, OptionsError, TrainOptions, resolve
from kt_sft_train.app.training import learning_rate


def decode_labelled(tokenizer, example) -> str:  # type: ignore[no-untyped-def]
    return tokenizer.decode(
        [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
    )


# -- formatting -----------------------------------------------------------------------------------------


def test_prompt_completion_without_template_learns_completion_and_eos() -> None:
    tokenizer = char_tokenizer()
    formatter = Formatter(tokenizer)
    example = formatter.encode({"prompt": "rev:abc=", "completion": "cba"}, max_seq_len=64)
    assert tokenizer.decode(example.input_ids) == "rev:abc=cba<eos>"
    assert decode_labelled(tokenizer, example) == "cba<eos>"
    prompt = formatter.prompt({"prompt": "rev:abc=", "completion": "cba"})
    assert tokenizer.decode(prompt.prompt_ids) == "rev:abc=" and prompt.reference == "cba"


def test_chat_template_masks_everything_but_assistant_turns() -> None:
    tokenizer = char_tokenizer(CHAT_TEMPLATE)
    formatter = Formatter(tokenizer)
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "rev:ab="},
        {"role": "assistant", "content": "ba"},
    ]
    example = formatter.encode({"messages": messages}, max_seq_len=128)
    assert tokenizer.decode(example.input_ids) == "U:hi\nA:yo<eos>U:rev:ab=\nA:ba<eos>"
    # Only the two answers and their end-of-turn tokens carry a label.
    assert decode_labelled(tokenizer, example) == "yo<eos>ba<eos>"
    prompt = formatter.prompt({"messages": messages})
    assert tokenizer.decode(prompt.prompt_ids) == "U:hi\nA:yo<eos>U:rev:ab=\nA:"
    # prompt/completion records go through the same template when there is one.
    pair = formatter.encode({"prompt": "rev:ab=", "completion": "ba"}, max_seq_len=128)
    assert tokenizer.decode(pair.input_ids) == "U:rev:ab=\nA:ba<eos>"
    assert decode_labelled(tokenizer, pair) == "ba<eos>"


def test_chat_template_off_and_messages_without_template_are_refused() -> None:
    tokenizer = char_tokenizer(CHAT_TEMPLATE)
    plain = Formatter(tokenizer, chat_template="off")
    assert tokenizer.decode(plain.encode({"prompt": "a=", "completion": "b"}, 16).input_ids) == "a=b<eos>"
    with pytest.raises(DataError, match="chat template"):
        plain.encode(
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, 16
        )
    with pytest.raises(ValueError, match="chat_template"):
        Formatter(tokenizer, chat_template="sometimes")


def test_truncation_drops_records_without_answer_tokens() -> None:
    formatter = Formatter(char_tokenizer())
    records = [{"prompt": "x" * 20, "completion": "y"}, {"prompt": "ab=", "completion": "ba"}]
    kept = tokenize_records(records, formatter, max_seq_len=8)
    assert len(kept) == 1 and all(len(e.input_ids) <= 8 for e in kept)
    with pytest.raises(DataError, match="max_seq_len=4"):
        tokenize_records(records[:1], formatter, max_seq_len=4)


def test_collate_pads_right_and_masks_padding() -> None:
    formatter = Formatter(char_tokenizer())
    examples = [
        formatter.encode({"prompt": p, "completion": c}, 64) for p, c in (("a=", "bb"), ("abcd=", "e"))
    ]
    batch = collate(examples, formatter.pad_token_id)
    assert batch["input_ids"].shape == (2, 7)
    assert batch["attention_mask"].sum(dim=1).tolist() == [5, 7]
    assert (batch["labels"][0, 5:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0, 5:] == formatter.pad_token_id).all()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"prompt": "a"}', "expected"),
        ('{"messages": []}', "non-empty"),
        ('{"messages": [{"role": "user", "content": "a"}]}', "last message"),
        ('{"messages": [{"role": "user"}]}', r"messages\[0\]"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n' + line + "\n")
    with pytest.raises(DataError, match=message) as error:
        read_jsonl(path)
    assert f"{path}:3" in str(error.value)


def test_missing_and_empty_data_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        read_jsonl(tmp_path / "empty.jsonl")


# -- batch order and schedule ---------------------------------------------------------------------------


def test_batch_schedule_is_a_function_of_seed_and_index() -> None:
    schedule = BatchSchedule(num_examples=10, batch_size=4, seed=3)
    assert schedule.batches_per_epoch == 3
    epoch0 = [schedule.indices(m) for m in range(3)]
    assert sorted(i for batch in epoch0 for i in batch) == list(range(10))
    assert [len(b) for b in epoch0] == [4, 4, 2]
    epoch1 = [schedule.indices(m) for m in range(3, 6)]
    assert epoch1 != epoch0 and sorted(i for b in epoch1 for i in b) == list(range(10))
    # Random access in any order gives the same batches (what --resume relies on).
    fresh = BatchSchedule(num_examples=10, batch_size=4, seed=3)
    assert [fresh.indices(m) for m in (5, 0, 4, 1)] == [epoch1[2], epoch0[0], epoch1[1], epoch0[1]]
    assert (
        BatchSchedule(10, 4, seed=4).indices(0) != epoch0[0]
        or BatchSchedule(10, 4, 4).indices(1) != epoch0[1]
    )


def test_learning_rate_schedules() -> None:
    base = TrainOptions(lr=1.0, warmup_steps=2)
    assert [learning_rate(base, s, 10) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    linear = TrainOptions(lr=1.0, lr_scheduler="linear")
    assert learning_rate(linear, 0, 4) == 1.0 and learning_rate(linear, 2, 4) == 0.5
    cosine = TrainOptions(lr=1.0, lr_scheduler="cosine")
    assert learning_rate(cosine, 0, 4) == 1.0 and abs(learning_rate(cosine, 2, 4) - 0.5) < 1e-12


def test_decile_means() -> None:
    losses = [float(v) for v in range(1, 21)]
    assert decile_means(losses) == (1.5, 19.5)
    assert decile_means([4.0, 2.0]) == (4.0, 2.0)


# -- options --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stand_in_job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_job(tmp_path_factory.mktemp("job"), job={"lora_r": 4, "steps": 12})


def test_option_precedence_job_then_yaml_then_flags(stand_in_job: Path) -> None:
    options = resolve({}, job_dir=stand_in_job)
    assert options.model == str(stand_in_job / "model") and options.heldout == str(
        stand_in_job / "heldout.jsonl"
    )
    assert (options.lora_r, options.steps, options.lr) == (4, 12, 0.01)
    options = resolve({"steps": 5}, job_dir=stand_in_job, config=ConfigFile(train={"steps": 7, "lr": 0.5}))
    assert (options.steps, options.lr) == (5, 0.5)


def test_one_resolve_defaults_job_yaml_environment_flags(stand_in_job: Path) -> None:
    # The experts' KTConfig travels inside TrainOptions; its fields follow the same precedence.
    file = ConfigFile(kt={"threads": 2, "backend": "reference"}, train={"steps": 7})
    assert resolve({}, job_dir=stand_in_job, environ={}).kt == KTConfig()
    from_file = resolve({}, job_dir=stand_in_job, config=file, environ={})
    assert (from_file.kt.threads, from_file.kt.backend, from_file.steps) == (2, "reference", 7)
    env = {"KT_SFT_NUM_THREADS": "3"}
    assert resolve({}, job_dir=stand_in_job, config=file, environ=env).kt.threads == 3
    flags = resolve({"threads": 4, "backend": "kernels"}, job_dir=stand_in_job, config=file, environ=env)
    assert (flags.kt.threads, flags.kt.backend) == (4, "kernels")
    with pytest.raises(KTConfigError, match="KT_SFT_THREADS is no longer read"):
        resolve({}, job_dir=stand_in_job, environ={"KT_SFT_THREADS": "3"})
    with pytest.raises(OptionsError, match=r"command line: KTConfig.threads must be a positive integer"):
        resolve({"threads": 0}, job_dir=stand_in_job, environ={})


def test_option_errors_name_the_option(stand_in_job: Path, tmp_path: Path) -> None:
    with pytest.raises(OptionsError, match="--lr must be a positive number"):
        TrainOptions(lr=-1.0)
    with pytest.raises(OptionsError, match="either --steps or --epochs"):
        TrainOptions(steps=3, epochs=1.0)
    with pytest.raises(OptionsError, match="--batch-size must be a positive integer"):
        TrainOptions(batch_size=0)
    with pytest.raises(OptionsError, match=r"unknown option 'lora_rank' \(did you mean 'lora_r'\?\)"):
        resolve({}, job_dir=stand_in_job, config=ConfigFile(train={"lora_rank": 8}))
    with pytest.raises(OptionsError, match="both --model"):
        resolve({"model": "x"}, job_dir=None)
    with pytest.raises(OptionsError, match="cannot be combined"):
        resolve({"model": "x", "data": "y"}, job_dir=stand_in_job)
    job = tmp_path / "job"
    job.mkdir()
    with pytest.raises(OptionsError, match=r"has no model/config\.json"):
        resolve({}, job_dir=job)
    (job / "model").mkdir()
    (job / "model" / "config.json").write_text("{}")
    write_jsonl(job / "train.jsonl", [{"prompt": "a", "completion": "b"}])
    (job / "job.json").write_text(json.dumps({"output": "/elsewhere"}))
    with pytest.raises(OptionsError, match="'output' cannot be set by a job file"):
        resolve({}, job_dir=job)


def test_total_steps_from_epochs() -> None:
    assert TrainOptions(batch_size=4, epochs=2.0).total_steps(10) == 6
    assert TrainOptions(batch_size=4, grad_accum=2).total_steps(10) == 2
    assert TrainOptions(steps=7).total_steps(10) == 7


# -- step-time split ------------------------------------------------------------------------------------


def test_step_timer_charges_the_cpu_experts_and_restores_everything(stand_in_job: Path) -> None:
    from kt_sft_train import KTConfig
    from kt_sft_train import autograd as kt_autograd
    from kt_sft_train.experts import KTExperts
    from kt_sft_train.model import load_kt_model
    from kt_sft_train.timing import StepTimer

    model = load_kt_model(stand_in_job / "model", KTConfig(backend="reference"), dtype=torch.float32)
    layers = [m.layer for m in model.modules() if isinstance(m, KTExperts)]
    assert kt_autograd.transfer_observer() is None
    ids = torch.randint(3, 40, (2, 12), generator=torch.Generator().manual_seed(0)).to(model.device)
    with StepTimer(model) as timer:
        assert kt_autograd.transfer_observer() is not None
        with pytest.raises(RuntimeError, match="already installed"):
            StepTimer(model).install()
        timer.start_step()
        model(input_ids=ids, labels=ids).loss.backward()
        split = timer.end_step()
    assert split.experts_cpu_s > 0 and split.transfer_s >= 0 and split.total_s >= split.experts_cpu_s
    assert abs(split.dense_s + split.experts_cpu_s + split.transfer_s - split.total_s) < 1e-9
    assert abs(sum(split.shares().values()) - 1.0) < 1e-9
    assert kt_autograd.transfer_observer() is None
    assert [m.layer for m in model.modules() if isinstance(m, KTExperts)] == layers


def test_overlap_flags() -> None:
    from kt_sft_train.app.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["train", "--overlap", "2"]).overlap_microbatches == 2
    assert parser.parse_args(["train", "--overlap", "3", "--no-overlap"]).overlap_microbatches == 1
    assert not hasattr(parser.parse_args(["train"]), "overlap_microbatches")  # job / YAML value stays
    assert TrainOptions().overlap_microbatches == 1
    with pytest.raises(OptionsError, match=r"--overlap must be a positive integer \(1 = off\), got 0"):
        TrainOptions(overlap_microbatches=0)
