"""Options of `kt-sft train`: one typed set (TrainOptions, holding the KTConfig of the experts), filled by
one `resolve()` from defaults < job.json < the --config YAML < KT_SFT_* environment < command-line flags,
and the job directories that carry a model, data and recommended hyperparameters.

A job directory (the embedded default one is package data, kt_sft_train/app/default_job/):
``model/`` (HF checkpoint + tokenizer; or those files at the top of the job directory), ``train.jsonl``,
``heldout.jsonl`` (optional), ``job.json`` (optional: recommended option values).
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from ..config import KTConfig, KTConfigError, canonical_kwargs, env_values

LR_SCHEDULERS = ("constant", "linear", "cosine")
DTYPES = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
CHAT_TEMPLATE = ("auto", "off")
JOB_FILE = "job.json"
RUN_FILE = "run.json"
# Recorded in run.json but chosen anew by every invocation (a resumed run does not inherit them).
_NOT_INHERITED = ("output", "resume", "overwrite", "progress", "config")
# Options that define what a checkpoint's adapter and optimizer state mean: a resumed run must match them.
RESUME_INVARIANTS = (
    "model",
    "data",
    "lora_r",
    "lora_alpha",
    "lora_targets",
    "batch_size",
    "grad_accum",
    "max_seq_len",
    "seed",
    "chat_template",
)


class OptionsError(ValueError):
    """An option value the trainer cannot use; the message names the option."""


@dataclass(frozen=True)
class TrainOptions:
    """Everything `kt-sft train` needs (CLI flag --x-y is field x_y; --threads, --backend: fields of kt)."""

    model: str | None = None
    data: str | None = None
    heldout: str | None = None
    output: str | None = None  # None: a new ./kt-sft-output/run-YYYYMMDD-HHMMSS (app/outputs.py)
    config: str | None = None
    description: str = ""
    seed: int = 0
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 4
    grad_accum: int = 1
    max_seq_len: int = 1024
    lr: float = 2e-4
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_r: int = 16
    lora_alpha: float | None = None
    lora_targets: str = "attention,experts"
    lora_dropout: float = 0.0  # on the dense (attention) LoRA only: PEFT has no dropout for parameter targets
    gradient_checkpointing: bool = False
    # Micro-batches of each batch run on threads of their own so the CPU experts of one overlap the GPU
    # work of another (kt_sft_train.overlap); 1 = off. Same gradients up to rounding (bitwise equal to
    # running those micro-batches one after the other).
    overlap_microbatches: int = 1
    kt: KTConfig = field(default_factory=KTConfig)  # the experts' config: --threads, --backend, YAML kt:
    dtype: str = "auto"
    device: str = "auto"
    chat_template: str = "auto"
    eval_max_new_tokens: int = 64
    eval_limit: int | None = 64
    eval_batch_size: int = 16
    save_every: int | None = None
    save_every_minutes: float = 10.0  # also a checkpoint when this much time passed since the last; 0: off
    skip_nonfinite_steps: bool = False
    keep_checkpoints: int = 2
    log_every: int = 1
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    report_to: str = "none"  # comma list of none, tensorboard, wandb, mlflow (app/reporting.py)

    def __post_init__(self) -> None:
        for name in (
            "batch_size",
            "grad_accum",
            "max_seq_len",
            "lora_r",
            "eval_max_new_tokens",
            "eval_batch_size",
            "keep_checkpoints",
            "log_every",
        ):
            _positive_int(name, getattr(self, name))
        for name in ("steps", "eval_limit", "save_every"):
            value = getattr(self, name)
            if value is not None:
                _positive_int(name, value)
        _non_negative_int("warmup_steps", self.warmup_steps)
        value = self.overlap_microbatches
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OptionsError(f"--overlap must be a positive integer (1 = off), got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise OptionsError(f"--seed must be a non-negative integer, got {self.seed!r}")
        _positive_float("lr", self.lr)
        _positive_float("max_grad_norm", self.max_grad_norm)
        if self.epochs is not None:
            _positive_float("epochs", self.epochs)
        if self.lora_alpha is not None:
            _positive_float("lora_alpha", self.lora_alpha)
        if (
            isinstance(self.save_every_minutes, bool)
            or not isinstance(self.save_every_minutes, (int, float))
            or not math.isfinite(self.save_every_minutes)
            or self.save_every_minutes < 0
        ):
            raise OptionsError(f"--save-every-minutes must be >= 0, got {self.save_every_minutes!r}")
        dropout = self.lora_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise OptionsError(f"--lora-dropout must be in [0, 1), got {dropout!r}")
        if not isinstance(self.report_to, str):
            raise OptionsError(f"--report-to must be a comma list, got {self.report_to!r}")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise OptionsError(f"--weight-decay must be >= 0, got {self.weight_decay!r}")
        _choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        _choice("dtype", self.dtype, DTYPES)
        _choice("device", self.device, DEVICES)
        _choice("chat_template", self.chat_template, CHAT_TEMPLATE)
        if self.steps is not None and self.epochs is not None:
            raise OptionsError("give either --steps or --epochs, not both")
        if not isinstance(self.lora_targets, str) or not lora_target_list(self.lora_targets):
            raise OptionsError(f"--lora-targets must be a comma list, got {self.lora_targets!r}")
        if not isinstance(self.kt, KTConfig):
            raise OptionsError(f"TrainOptions.kt must be a KTConfig, got {type(self.kt).__name__}")

    def with_values(self, values: Mapping[str, Any], source: str) -> TrainOptions:
        """A copy with `values` applied; unknown keys are an error naming `source`.

        Keys are TrainOptions fields or KTConfig fields (threads, backend, ...: they go to `kt`).
        """
        names = [f.name for f in fields(self) if f.name != "kt"]
        kt_names = [f.name for f in fields(KTConfig)]
        for key in values:
            if key not in names and key not in kt_names:
                close = difflib.get_close_matches(str(key), names + kt_names, n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise OptionsError(f"{source}: unknown option {key!r}{hint}")
        own = {k: v for k, v in values.items() if k in names}
        kt_changes = {k: v for k, v in values.items() if k in kt_names}
        try:
            kt = self.kt.replace(**kt_changes) if kt_changes else self.kt
            return replace(self, kt=kt, **own)
        except (OptionsError, KTConfigError) as error:
            raise OptionsError(f"{source}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        """The options without the KTConfig (run.json records that as kt_config)."""
        values = asdict(self)
        del values["kt"]
        return values

    def total_steps(self, num_examples: int) -> int:
        """Optimizer steps of the run: --steps, else --epochs (default 1) over the data."""
        if self.steps is not None:
            return self.steps
        batches_per_epoch = -(-num_examples // self.batch_size)
        epochs = 1.0 if self.epochs is None else self.epochs
        return max(1, math.ceil(batches_per_epoch * epochs / self.grad_accum))


def lora_target_list(targets: str) -> list[str]:
    return [part.strip() for part in targets.split(",") if part.strip()]


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise OptionsError(f"--{name.replace('_', '-')} must be one of {list(choices)}, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionsError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")


def _non_negative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise OptionsError(f"--{name.replace('_', '-')} must be a non-negative integer, got {value!r}")


def _positive_float(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise OptionsError(f"--{name.replace('_', '-')} must be a positive number, got {value!r}")


# -- jobs -----------------------------------------------------------------------------------------------


def default_job_dir() -> Path:
    """The embedded default job (package data)."""
    return Path(str(resources.files("kt_sft_train.app") / "default_job"))


@dataclass(frozen=True)
class Job:
    directory: Path
    settings: dict[str, Any]

    @property
    def model(self) -> Path:
        nested = self.directory / "model"
        return nested if (nested / "config.json").is_file() else self.directory

    @property
    def train_data(self) -> Path:
        return self.directory / "train.jsonl"

    @property
    def heldout_data(self) -> Path | None:
        path = self.directory / "heldout.jsonl"
        return path if path.is_file() else None


def load_job(directory: str | os.PathLike[str]) -> Job:
    """Read a job directory; a missing piece is an error naming the file."""
    directory = Path(directory)
    if not directory.is_dir():
        if directory == default_job_dir():
            raise OptionsError(
                f"the embedded default job is missing from this installation ({directory}); reinstall "
                "kt-sft-train, or pass --model PATH --data FILE.jsonl"
            )
        raise OptionsError(f"--job {str(directory)!r} is not a directory")
    if not (directory / "model" / "config.json").is_file() and not (directory / "config.json").is_file():
        raise OptionsError(f"job directory {directory} has no model/config.json (nor config.json)")
    if not (directory / "train.jsonl").is_file():
        raise OptionsError(f"job directory {directory} has no train.jsonl")
    settings: dict[str, Any] = {}
    job_file = directory / JOB_FILE
    if job_file.is_file():
        try:
            settings = json.loads(job_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise OptionsError(f"{job_file}: not valid JSON ({error.msg})") from None
        if not isinstance(settings, dict):
            raise OptionsError(f"{job_file}: expected a JSON object")
    for key in ("model", "data", "heldout", "output", "resume", "overwrite", "config"):
        if key in settings:
            raise OptionsError(f"{job_file}: {key!r} cannot be set by a job file")
    return Job(directory, settings)


@dataclass(frozen=True)
class ConfigFile:
    """The --config YAML: a KTConfig mapping (`kt:` or the whole file) and the `train:` options."""

    kt: Mapping[str, Any] = field(default_factory=dict)
    train: Mapping[str, Any] = field(default_factory=dict)


def read_config_file(path: str | os.PathLike[str] | None) -> ConfigFile:
    """Read --config: a KTConfig mapping, or `kt:` and `train:` sections (train: takes the CLI options)."""
    if path is None:
        return ConfigFile()
    import yaml

    file = Path(path)
    if not file.is_file():
        raise OptionsError(f"--config {str(path)!r} does not exist")
    data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise OptionsError(f"--config {path}: expected a YAML mapping")
    if not set(data) & {"kt", "train"}:
        return ConfigFile(kt=data)
    extra = sorted(set(data) - {"kt", "train"})
    if extra:
        raise OptionsError(f"--config {path}: unknown top-level keys {extra} (expected kt:, train:)")
    train = {str(k).replace("-", "_"): v for k, v in (data.get("train") or {}).items()}
    return ConfigFile(kt=dict(data.get("kt") or {}), train=train)


def _recorded_run(cli_values: Mapping[str, Any]) -> TrainOptions | None:
    """The options recorded in --output's run.json when --resume is given (None: nothing to inherit)."""
    if not cli_values.get("resume") or cli_values.get("output") is None:
        return None
    run_file = Path(cli_values["output"]) / RUN_FILE
    if not run_file.is_file():
        return None
    try:
        recorded = json.loads(run_file.read_text(encoding="utf-8"))
        values = {k: v for k, v in recorded["options"].items() if k not in _NOT_INHERITED}
        kt = KTConfig.from_mapping(recorded.get("kt_config") or {})
    except (OSError, ValueError, KeyError, TypeError, KTConfigError) as error:
        raise OptionsError(f"--resume: cannot read the run's options from {run_file} ({error})") from None
    return replace(TrainOptions(kt=kt).with_values(values, str(run_file)), resume=True)


def _same_value(name: str, a: Any, b: Any) -> bool:
    if name in ("model", "data") and a is not None and b is not None:
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def _refuse_changed_invariants(recorded: TrainOptions, explicit: Mapping[str, Any]) -> None:
    changed = [
        name
        for name in RESUME_INVARIANTS
        if name in explicit and not _same_value(name, getattr(recorded, name), explicit[name])
    ]
    if changed:
        details = ", ".join(f"{n}: {getattr(recorded, n)!r} -> {explicit[n]!r}" for n in changed)
        flags = " ".join(f"--{n.replace('_', '-')}" for n in changed)
        raise OptionsError(
            f"--resume: the run was trained with other options ({details}); drop {flags} to continue it "
            "with its recorded options"
        )


def resolve(
    cli_values: Mapping[str, Any],
    *,
    job_dir: str | os.PathLike[str] | None = None,
    config: ConfigFile | None = None,
    environ: Mapping[str, str] | None = None,
) -> TrainOptions:
    """The one place of precedence: defaults < job.json < --config YAML < KT_SFT_* environment < CLI flags.

    With no --model/--data (from any source) the job directory is used: --job, else the embedded default.
    `environ` defaults to os.environ.
    """
    config = ConfigFile() if config is None else config
    options = TrainOptions()
    sources = (cli_values, config.train)
    explicit = any(source.get(key) is not None for source in sources for key in ("model", "data"))
    recorded = _recorded_run(cli_values)
    if recorded is not None:
        # `--resume --output DIR` alone continues the run with the options it recorded.
        options = recorded
        _refuse_changed_invariants(recorded, {**config.train, **cli_values})
    elif job_dir is not None or not explicit:
        if explicit:
            raise OptionsError("--job cannot be combined with --model/--data")
        job = load_job(default_job_dir() if job_dir is None else job_dir)
        options = options.with_values(job.settings, str(job.directory / JOB_FILE))
        heldout = job.heldout_data
        options = replace(
            options,
            model=str(job.model),
            data=str(job.train_data),
            heldout=None if heldout is None else str(heldout),
        )
    try:
        KTConfig.from_mapping(config.kt)  # the whole mapping validated (aliases, values) before it is applied
        kt_from_file = canonical_kwargs(config.kt)
    except KTConfigError as error:
        raise KTConfigError(f"the kt: section of --config: {error}") from None
    options = options.with_values(kt_from_file, "the kt: section of --config")
    options = options.with_values(config.train, "the `train:` section of --config")
    try:
        from_env = env_values(environ)
    except KTConfigError as error:
        raise KTConfigError(f"{error} (from the KT_SFT_* environment variables)") from None
    options = options.with_values(from_env, "the KT_SFT_* environment")
    options = options.with_values(cli_values, "command line")
    if options.model is None or options.data is None:
        raise OptionsError("give both --model PATH and --data FILE.jsonl (or neither, for the default job)")
    return options
