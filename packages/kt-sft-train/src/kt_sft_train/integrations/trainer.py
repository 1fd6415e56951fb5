"""A transformers TrainerCallback that logs the CPU-experts / transfers / dense time split of each step.

Works with `transformers.Trainer` and every trainer built on it (TRL's SFTTrainer, ...):

    trainer = Trainer(model=peft_model, ..., callbacks=[KTTimeSplitCallback()])

Each log record gets `kt_experts_cpu_s`, `kt_transfer_s`, `kt_dense_s` (mean seconds per optimizer step
since the previous log) and `kt_experts_share` (fraction of the step in the CPU experts). With CUDA the
timer synchronizes around each host<->device copy (see kt_sft_train.timing), which costs a little
throughput; leave the callback out for production runs that do not need the split.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ..timing import StepSplit, StepTimer

_ZERO = StepSplit(0.0, 0.0, 0.0)


class KTTimeSplitCallback(TrainerCallback):
    """Measures every optimizer step of a model with KTExperts and adds the split to the Trainer's logs."""

    def __init__(self) -> None:
        self.timer: StepTimer | None = None
        self.window = _ZERO
        self.window_steps = 0
        self.total = _ZERO
        self.total_steps = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise ValueError("KTTimeSplitCallback needs the model (the Trainer passes it to on_train_begin)")
        if self.timer is not None:  # a previous train() of this callback ended in an exception
            self.timer.remove()
        self.timer = StepTimer(model).install()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.timer is not None:
            self.timer.start_step()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.timer is None:
            return
        split = self.timer.end_step()
        self.window = self.window + split
        self.window_steps += 1
        self.total = self.total + split
        self.total_steps += 1

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if logs is None or self.window_steps == 0:
            return
        record = split_record(self.window, self.window_steps)
        logs.update(record)
        # The Trainer appended a copy of `logs` to the history just before calling us: complete it too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(record)
        self.window = _ZERO
        self.window_steps = 0

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.timer is not None:
            self.timer.remove()
            self.timer = None

    def summary(self) -> dict[str, float]:
        """Mean split per optimizer step over the whole run."""
        return split_record(self.total, self.total_steps) if self.total_steps else {}


def split_record(split: StepSplit, steps: int) -> dict[str, float]:
    return {
        "kt_step_time_s": split.total_s / steps,
        "kt_experts_cpu_s": split.experts_cpu_s / steps,
        "kt_transfer_s": split.transfer_s / steps,
        "kt_dense_s": split.dense_s / steps,
        "kt_experts_share": split.shares()["experts_cpu"],
    }
