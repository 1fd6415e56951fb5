"""--report-to: the step and eval metrics of a run also go to TensorBoard, Weights & Biases or MLflow,
through each tool's own library (the ones transformers' integrations use). metrics.jsonl is always written;
these are extra sinks. A missing library is an OptionsError before anything loads.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Protocol

from .options import OptionsError

REPORT_TARGETS = ("none", "tensorboard", "wandb", "mlflow")
# target -> (the module that must be importable, the pip package that provides it)
_REQUIREMENTS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}


class Reporter(Protocol):
    def log(self, values: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def report_targets(value: str) -> list[str]:
    """Parse --report-to (a comma list); raises OptionsError naming the option for an unknown target."""
    targets = [part.strip() for part in value.split(",") if part.strip()]
    unknown = [t for t in targets if t not in REPORT_TARGETS]
    if unknown or not targets:
        raise OptionsError(f"--report-to must be a comma list of {list(REPORT_TARGETS)}, got {value!r}")
    return [t for t in targets if t != "none"]


def check_available(value: str) -> None:
    """Up front: every requested target's library is installed."""
    for target in report_targets(value):
        module, package = _REQUIREMENTS[target]
        if importlib.util.find_spec(module) is None:
            raise OptionsError(
                f"--report-to {target} needs the {package!r} package, which is not installed "
                f"(pip install {package}), or drop --report-to {target}"
            )


class _TensorBoard:
    def __init__(self, output: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(output / "tensorboard"))

    def log(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, output: Path, config: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(dir=str(output), config=config, name=output.name)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, output: Path, config: dict[str, Any]) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.start_run(run_name=output.name)
        mlflow.log_params({k: str(v)[:250] for k, v in config.items()})

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class Reporters:
    """All requested sinks; `log` sends the numeric values of one record to each."""

    def __init__(self, value: str, output: Path, config: dict[str, Any]) -> None:
        check_available(value)
        self.sinks: list[Reporter] = []
        for target in report_targets(value):
            if target == "tensorboard":
                self.sinks.append(_TensorBoard(output))
            elif target == "wandb":
                self.sinks.append(_WandB(output, config))
            else:
                self.sinks.append(_MLflow(output, config))

    def log(self, record: dict[str, Any], step: int, prefix: str) -> None:
        if not self.sinks:
            return
        values = {
            f"{prefix}/{k}": float(v)
            for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        for sink in self.sinks:
            sink.log(values, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
