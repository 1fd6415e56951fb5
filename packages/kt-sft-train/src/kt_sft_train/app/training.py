"""The `kt-sft train` loop: LoRA fine-tuning of a KT model with the routed experts on the CPU.

Output directory:
    adapter/                     the final PEFT adapter (vanilla PeftModel.from_pretrained loads it)
    checkpoints/step-NNNNNN/     adapter/, optimizer.pt, rng.pt, state.json (what --resume reads)
    metrics.jsonl                one JSON object per logged step, eval and the summary
    loss.png                     the loss curve
    run.json                     resolved options, KTConfig, versions, hardware tier
    summary.json                 first/last loss, held-out accuracy before/after, throughput, time split

Resuming: the data order and the learning rate are functions of the step number alone
(data.BatchSchedule, `learning_rate`), so adapter + optimizer state + step + RNG state are enough to
continue exactly where a run stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import KTConfig
from ..overlap import label_tokens, run_microbatches, split_batch
from ..timing import StepSplit, StepTimer
from ..versions import library_versions
from .checkpoints import (
    CHECKPOINTS,
    check_checkpoint_base,
    check_resume_compatible,
    full_adapter_state,
    gather_full_state,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    trainable_parameters,
)
from .data import (
    BatchSchedule,
    Formatter,
    PromptExample,
    TokenizedExample,
    collate,
    read_jsonl,
    tokenize_records,
)
from .evaluation import ExactMatch, exact_match
from .metrics import (
    METRICS,
    MetricsLog,
    Progress,
    decile_means,
    resident_mib,
    split_text,
    summary_lines,
)
from .model_setup import (
    apply_dense_lora_dropout,
    describe_model,
    experts_memory_line,
    kernel_tier,
    lora_config_for,
)
from .nonfinite import NonFiniteError, first_nonfinite_gradient, first_nonfinite_output, nonfinite_message
from .options import OptionsError, TrainOptions
from .outputs import check_writable, create_run_directory, new_run_directory, remove_if_empty
from .ranks import RankContext, launched_with_sharding
from .reporting import Reporters, check_available

logger = logging.getLogger(__name__)

_OWNED_OUTPUTS = ("adapter", CHECKPOINTS, METRICS, "loss.png", "run.json", "summary.json")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; `checkpoint` is the newest resumable checkpoint (None: nothing to resume)."""

    def __init__(self, output: Path, checkpoint: Path | None) -> None:
        super().__init__(str(output))
        self.output = output
        self.checkpoint = checkpoint


@dataclass
class TrainResult:
    output: Path
    adapter: Path
    steps: int
    losses: list[float]
    accuracy_before: float | None
    accuracy_after: float | None
    tokens_per_s: float
    split: StepSplit
    summary: dict[str, Any] = field(default_factory=dict)


# -- small pieces ---------------------------------------------------------------------------------------


def learning_rate(options: TrainOptions, step: int, total_steps: int) -> float:
    """LR of optimizer step `step` (0-based): linear warmup, then constant / linear / cosine decay to 0."""
    if step < options.warmup_steps:
        return options.lr * (step + 1) / options.warmup_steps
    if options.lr_scheduler == "constant":
        return options.lr
    span = max(1, total_steps - options.warmup_steps)
    progress = min(1.0, (step - options.warmup_steps) / span)
    if options.lr_scheduler == "linear":
        return options.lr * (1.0 - progress)
    return options.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise OptionsError("--device cuda: no CUDA GPU is visible to PyTorch")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # The dense part on a CPU without native bf16 matmuls is faster and exact enough in fp32; the
        # experts run in the bf16 kernels either way.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# -- output directory -----------------------------------------------------------------------------------


def prepare_output(output: Path, options: TrainOptions) -> list[Path]:
    """Refuse to mix a new run into a previous one unless --resume or --overwrite says what to do.

    Returns the folders it created (a failed run removes them again while they are empty).
    """
    if options.resume and options.overwrite:
        raise OptionsError("--resume and --overwrite contradict each other")
    check_writable(output)
    previous = [name for name in _OWNED_OUTPUTS if (output / name).exists()]
    if previous and not options.resume:
        if not options.overwrite:
            raise OptionsError(
                f"--output {str(output)!r} already holds a run ({', '.join(previous)}); pass --resume to "
                "continue it, --overwrite to replace it, or another --output"
            )
        for name in previous:
            path = output / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return create_run_directory(output)


# -- the run --------------------------------------------------------------------------------------------


def run_training(options: TrainOptions, *, echo: Callable[[str], None] = print) -> TrainResult:
    wall_start = time.perf_counter()
    if not (Path(options.model) / "config.json").is_file():
        raise OptionsError(
            f"--model {options.model!r} is not a local Hugging Face checkpoint directory (no config.json)"
        )
    ranks = RankContext.from_environment()
    if not ranks.writes_files:
        echo = _silent
    check_available(options.report_to)
    if ranks.distributed and options.output is None:
        raise OptionsError(
            f"--output DIR is required with {ranks.world_size} ranks (they share one run folder)"
        )
    if options.output is None:
        if options.resume:
            raise OptionsError("--resume needs --output DIR: the run folder to continue")
        output = new_run_directory()
    else:
        output = Path(options.output)
    kt = ranks.experts_config(options)
    device = ranks.device(resolve_device(options.device))
    ranks.init_process_group(device, kt)
    created = prepare_output(output, options) if ranks.writes_files else []
    ranks.barrier()
    from transformers.utils import logging as hf_logging

    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    if not options.progress:
        hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar
    try:
        return _run(options, output, echo, wall_start, ranks, kt, device)
    except TrainingInterrupted:
        remove_if_empty(created)
        raise
    except KeyboardInterrupt:
        remove_if_empty(created)
        raise TrainingInterrupted(output, latest_checkpoint(output)) from None
    except BaseException:
        remove_if_empty(created)
        raise
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()


def _run(
    options: TrainOptions,
    output: Path,
    echo: Callable[[str], None],
    wall_start: float,
    ranks: RankContext,
    kt: KTConfig,
    device: torch.device,
) -> TrainResult:
    from transformers import AutoTokenizer

    from ..adapters import save_adapter
    from ..model import load_kt_model
    from ..quantized_cache import quantized_cache_report

    # Files of this rank: the output for rank 0, a scratch directory for the others (nothing shared).
    files = output if ranks.writes_files else Path(tempfile.mkdtemp(prefix=f"kt-sft-rank{ranks.rank}-"))
    checkpoint = latest_checkpoint(output) if options.resume else None
    if options.resume:
        if checkpoint is None:
            raise OptionsError(f"--resume: no checkpoint in {output / CHECKPOINTS}")
        check_resume_compatible(output, options)
    echo(f"output    {output}")

    if kt.threads is not None:
        torch.set_num_threads(kt.threads)
    dtype = resolve_dtype(options.dtype, device)
    seed_everything(options.seed)
    if options.description:
        echo(options.description)

    tokenizer = AutoTokenizer.from_pretrained(options.model, local_files_only=True)
    formatter = Formatter(tokenizer, options.chat_template)
    examples = tokenize_records(read_jsonl(options.data), formatter, options.max_seq_len, name=options.data)
    prompts: list[PromptExample] = []
    if options.heldout is not None:
        heldout = read_jsonl(options.heldout)
        limit = len(heldout) if options.eval_limit is None else options.eval_limit
        prompts = [formatter.prompt(record) for record in heldout[:limit]]
    total_steps = options.total_steps(len(examples))

    load_start = time.perf_counter()
    model = load_kt_model(options.model, kt, dtype=dtype, device_map={"": str(device)})
    load_time = time.perf_counter() - load_start
    echo(f"model     {options.model}: {describe_model(model)}; loaded in {load_time:.1f} s")
    echo(f"experts   CPU ({kernel_tier(kt)}), dense part on {device} in {str(dtype).removeprefix('torch.')}")
    memory_line = experts_memory_line(model, options.model, kt)
    if memory_line:
        echo(memory_line)
    cache_report = quantized_cache_report(model)
    if cache_report is not None:
        echo(f"cache     quantized experts: {cache_report.summary()}")
    echo(
        f"data      {len(examples)} examples ({formatter.mode}), {total_steps} steps x batch "
        f"{options.batch_size} x accumulation {options.grad_accum}"
    )

    if checkpoint is not None:
        check_checkpoint_base(checkpoint, model)  # before the evaluation and the LoRA touch the model
    evaluate = _evaluator(tokenizer, prompts, options, device, formatter.pad_token_id)
    before = evaluate(model, "before", echo)

    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config_for(model, options))
    if options.lora_dropout:
        apply_dense_lora_dropout(peft_model, options.lora_dropout)
    if options.gradient_checkpointing:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    parameters = [p for _, p in trainable_parameters(peft_model)]
    # fused: one pass per tensor; torch's default for CPU parameters (the experts' LoRA, billions of values
    # for the largest models) is a loop of whole-tensor ops, 5-7x slower there. Same results.
    # Under FSDP2 the dense parameters become DTensors while the owner's expert LoRA stays plain: the fused
    # and foreach kernels take one kind per call, so AdamW runs its per-parameter loop there.
    fused = {"foreach": False} if ranks.distributed and launched_with_sharding() else {"fused": True}
    optimizer = torch.optim.AdamW(parameters, lr=options.lr, weight_decay=options.weight_decay, **fused)
    forward_model = ranks.prepare(peft_model, optimizer)
    start_step = 0
    if checkpoint is not None:
        start_step = load_checkpoint(checkpoint, peft_model, optimizer)
        echo(f"resume    from {checkpoint} (step {start_step})")
    if start_step >= total_steps:
        raise OptionsError(
            f"--resume: the checkpoint is at step {start_step}, the run has {total_steps} steps"
        )

    _write_run_file(files, options, kt, device, dtype, ranks)
    reporters = Reporters(options.report_to, files, options.to_dict())
    metrics = MetricsLog(
        files / METRICS, keep_steps_upto=start_step if checkpoint else None, reporters=reporters
    )
    if before is not None and checkpoint is None:
        metrics.write({"event": "eval", "phase": "before", **before.as_dict()})
    trained = _train_steps(
        peft_model,
        forward_model,
        ranks,
        optimizer,
        examples,
        formatter.pad_token_id,
        options,
        device,
        start_step,
        total_steps,
        metrics,
        output,
    )

    adapter = output / "adapter"
    gathered = full_adapter_state(peft_model)  # FSDP2: the dense LoRA gathered on every rank
    if ranks.writes_files:
        save_adapter(peft_model, adapter, **({} if gathered is None else {"state_dict": gathered}))
    ranks.barrier()
    with ranks.whole_model(forward_model):
        after = evaluate(peft_model, "after", echo)
    if after is not None:
        metrics.write({"event": "eval", "phase": "after", **after.as_dict()})
    history = metrics.step_losses()
    losses = [loss for _, loss in history]
    summary = _summary(options, kt, device, history, before, after, trained, wall_start, adapter, output)
    metrics.write({"event": "summary", **summary})
    metrics.close()
    _write_json(files / "summary.json", summary)
    _plot(files, history, before, after)
    ranks.finish()
    for line in summary_lines(summary):
        echo(line)
    return TrainResult(
        output=output,
        adapter=adapter,
        steps=total_steps,
        losses=losses,
        accuracy_before=None if before is None else before.accuracy,
        accuracy_after=None if after is None else after.accuracy,
        tokens_per_s=summary["tokens_per_s"],
        split=trained.split,
        summary=summary,
    )


@dataclass
class _Trained:
    tokens: int
    split: StepSplit


class _DeferredInterrupt:
    """The first Ctrl-C lets the current step finish and a checkpoint be saved; a second one stops at once.

    Stopping between steps keeps adapter and optimizer state consistent (never half an optimizer update).
    Signal handlers can only be set from the main thread; elsewhere Ctrl-C stays a plain KeyboardInterrupt.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> _DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nkt-sft: interrupted: finishing this step and saving a checkpoint (Ctrl-C again to stop now)",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            previous = self._previous if self._previous is not None else signal.default_int_handler
            signal.signal(signal.SIGINT, previous)


def _train_steps(
    model: nn.Module,
    forward_model: nn.Module,
    ranks: RankContext,
    optimizer: torch.optim.Optimizer,
    examples: Sequence[TokenizedExample],
    pad_token_id: int,
    options: TrainOptions,
    device: torch.device,
    start_step: int,
    total_steps: int,
    metrics: MetricsLog,
    output: Path,
) -> _Trained:
    schedule = BatchSchedule(len(examples), options.batch_size, options.seed)
    parameters = [p for _, p in trainable_parameters(model)]
    progress = Progress(total_steps, start_step, options.progress)
    tokens_total = 0
    split_total = StepSplit(0.0, 0.0, 0.0)
    saved_step = start_step
    last_save = time.monotonic()
    model.train()
    try:
        with StepTimer(model) as timer, _DeferredInterrupt() as interrupt:
            for step in range(start_step, total_steps):
                lr = learning_rate(options, step, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                timer.start_step()
                step_loss, step_tokens = 0.0, 0
                nonfinite: str | None = None
                for micro in range(options.grad_accum):
                    indices = ranks.shard(schedule.indices(step * options.grad_accum + micro))
                    batch = {
                        k: v.to(device)
                        for k, v in collate([examples[i] for i in indices], pad_token_id).items()
                    }
                    # Distributed: the loss is scaled so that DDP's average is the global batch's token mean.
                    scale, tokens, total = ranks.loss_scale(batch["labels"])
                    loss = _forward_backward(forward_model, batch, parameters, options, scale)
                    if not torch.isfinite(loss):
                        # With several ranks a lone re-run would wait for the others' experts exchange.
                        where = None if ranks.distributed else first_nonfinite_output(model, batch)
                        nonfinite = nonfinite_message(f"the loss ({loss.item()})", step + 1, where)
                        break
                    step_loss += ranks.global_mean(loss, tokens, total) / options.grad_accum
                    step_tokens += int(batch["attention_mask"].sum())
                if nonfinite is None:
                    bad_gradient = first_nonfinite_gradient(model)
                    if bad_gradient is not None:
                        nonfinite = nonfinite_message("a gradient", step + 1, f"{bad_gradient}.grad")
                if nonfinite is not None:
                    optimizer.zero_grad(set_to_none=True)
                    timer.end_step()
                    if not options.skip_nonfinite_steps:
                        raise NonFiniteError(nonfinite)
                    logger.warning("skipped: %s", nonfinite)
                    metrics.write({"event": "skipped", "step": step + 1, "reason": nonfinite})
                    progress.update("skipped a non-finite step")
                    continue
                grad_norm = ranks.clip_grad_norm_(model, parameters, options.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                split = timer.end_step()
                tokens_total += step_tokens
                split_total = split_total + split
                done = step + 1
                if done % options.log_every == 0 or done == total_steps:
                    metrics.write(
                        {
                            "event": "step",
                            "step": done,
                            "epoch": schedule.epoch_of(step * options.grad_accum),
                            "loss": step_loss,
                            "lr": lr,
                            "grad_norm": grad_norm,
                            "tokens": step_tokens,
                            "tokens_per_s": step_tokens / split.total_s if split.total_s > 0 else 0.0,
                            "rss_mib": resident_mib(),
                            **split.as_dict(),
                        }
                    )
                rate = tokens_total / split_total.total_s if split_total.total_s > 0 else 0.0
                progress.update(
                    f"loss {step_loss:.4f} | {rate:,.0f} tok/s | {split_text(split_total, device)}"
                )
                by_steps = options.save_every is not None and done % options.save_every == 0
                minutes = options.save_every_minutes
                by_time = minutes > 0 and time.monotonic() - last_save >= 60.0 * minutes
                # Every rank takes the same decisions (time and signals are per process).
                save_now, stop_now = ranks.any_rank(
                    by_steps or by_time or interrupt.requested, interrupt.requested
                )
                if save_now and done < total_steps:
                    _save_checkpoint(ranks, output, done, model, optimizer, options.keep_checkpoints)
                    saved_step, last_save = done, time.monotonic()
                if stop_now and done < total_steps:
                    raise TrainingInterrupted(output, latest_checkpoint(output))
            if saved_step != total_steps:
                _save_checkpoint(ranks, output, total_steps, model, optimizer, options.keep_checkpoints)
    finally:
        progress.close()
    return _Trained(tokens_total, split_total)


def _forward_backward(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    parameters: list[nn.Parameter],
    options: TrainOptions,
    scale: float = 1.0,
) -> torch.Tensor:
    """The batch's mean loss, its gradient * scale / grad_accum accumulated into .grad; micro-batches
    overlapped on threads when options.overlap_microbatches > 1 (each weighted by its share of the label
    tokens, so the sum is the batch's mean loss)."""
    parts = min(options.overlap_microbatches, int(batch["input_ids"].shape[0]))
    microbatches = [mb for mb in split_batch(batch, parts) if label_tokens(mb) > 0] if parts > 1 else []
    if len(microbatches) < 2:
        loss = model(**batch, use_cache=False).loss
        (loss * scale / options.grad_accum).backward()
        return loss.detach()
    total = sum(label_tokens(mb) for mb in microbatches)
    weights = [label_tokens(mb) / total for mb in microbatches]
    weighted = run_microbatches(
        lambda mb: model(**mb, use_cache=False).loss * scale / options.grad_accum,
        microbatches,
        parameters=parameters,
        weights=weights,
    )
    return weighted * options.grad_accum / scale


def _save_checkpoint(
    ranks: RankContext, output: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, keep: int
) -> None:
    # Rank 0 owns the experts of its host: its adapter and optimizer state are the whole run's (with
    # FSDP2's dense shards gathered first, on every rank).
    full = gather_full_state(model, optimizer)
    if ranks.writes_files:
        save_checkpoint(output, step, model, optimizer, keep, full)
    ranks.barrier()


def _silent(text: str) -> None:
    """The echo of ranks other than 0."""


def _evaluator(
    tokenizer: Any,
    prompts: list[PromptExample],
    options: TrainOptions,
    device: torch.device,
    pad_token_id: int,
) -> Callable[[nn.Module, str, Callable[[str], None]], ExactMatch | None]:
    def evaluate(model: nn.Module, phase: str, echo: Callable[[str], None]) -> ExactMatch | None:
        if not prompts:
            return None
        result = exact_match(
            model,
            tokenizer,
            prompts,
            max_new_tokens=options.eval_max_new_tokens,
            batch_size=options.eval_batch_size,
            device=device,
            pad_token_id=pad_token_id,
        )
        echo(
            f"eval      {phase}: held-out exact match {result.accuracy:.1%} "
            f"({result.correct}/{result.total}) in {result.seconds:.1f} s"
        )
        return result

    return evaluate


def _write_json(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def _write_run_file(
    output: Path,
    options: TrainOptions,
    kt: KTConfig,
    device: torch.device,
    dtype: torch.dtype,
    ranks: RankContext,
) -> None:
    _write_json(
        output / "run.json",
        {
            "options": options.to_dict(),
            "kt_config": kt.to_dict(),
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "experts": kernel_tier(kt),
            "ranks": {"world_size": ranks.world_size, "dense_parallel": ranks.dense_parallel},
            "versions": library_versions(),
        },
    )


def _summary(
    options: TrainOptions,
    kt: KTConfig,
    device: torch.device,
    history: list[tuple[int, float]],
    before: ExactMatch | None,
    after: ExactMatch | None,
    trained: _Trained,
    wall_start: float,
    adapter: Path,
    output: Path,
) -> dict[str, Any]:
    losses = [loss for _, loss in history]
    first_decile, last_decile = decile_means(losses)
    split = trained.split
    return {
        "steps": history[-1][0] if history else 0,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "first_10pct_loss": first_decile,
        "last_10pct_loss": last_decile,
        "accuracy_before": None if before is None else before.accuracy,
        "accuracy_after": None if after is None else after.accuracy,
        "heldout_examples": None if after is None else after.total,
        "tokens": trained.tokens,
        "tokens_per_s": trained.tokens / split.total_s if split.total_s > 0 else 0.0,
        "time_split_s": split.as_dict(),
        "time_split_share": split.shares(),
        "device": str(device),
        "experts": kernel_tier(kt),
        "wall_time_s": time.perf_counter() - wall_start,
        "adapter": str(adapter),
        "metrics": str(output / METRICS),
        "loss_plot": str(output / "loss.png"),
    }


def _plot(
    output: Path, history: list[tuple[int, float]], before: ExactMatch | None, after: ExactMatch | None
) -> None:
    from .plot import plot_loss

    if not history:
        return
    note = ""
    if before is not None and after is not None:
        note = f"held-out exact match {before.accuracy:.1%} -> {after.accuracy:.1%}"
    plot_loss([s for s, _ in history], [loss for _, loss in history], output / "loss.png", note=note)
