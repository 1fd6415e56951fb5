"""KTConfig: the one typed, validated configuration of kt-sft training.

Build it from keyword arguments, a mapping (`from_mapping`, e.g. a parsed YAML section), a YAML file
(`from_yaml`) or `KT_SFT_*` environment variables (`from_env`). Unknown keys are rejected with a
suggestion; upstream kt-kernel style `kt_`-prefixed names are accepted as aliases. Constructing a
config has no side effects: the kernel wheel is only touched when an experts layer is built.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

BACKENDS = ("kernels", "reference")
WEIGHT_DTYPES = ("bf16", "int8", "int4")
GROUP_SIZES = (32, 64, 128)  # int4 groups along the reduction dimension (the kernels' choices)
ACTIVATION_POLICIES = ("retain", "recompute")
ISA_TIERS = ("portable", "avx2", "avx512", "avx512_bf16", "amx")
DISTRIBUTED_MODES = ("none", "host_owner")
EXCHANGE_TRANSPORTS = ("shm", "gloo")
ENV_PREFIX = "KT_SFT_"
# One variable per fact (docs/environment.md lists them all). A KTConfig field is KT_SFT_<FIELD>, except
# the thread count: KT_SFT_NUM_THREADS, which the kernel wheel also reads for its default pool.
ENV_NAMES = {"threads": "KT_SFT_NUM_THREADS"}
# Variables of the KT_SFT_ namespace that belong to the kernel wheel only, not to KTConfig.
# (read by kt_sft_kernels itself)
KERNEL_ONLY_ENV = frozenset({"KT_SFT_PROFILE", "KT_SFT_KERNEL_VARIANT", "KT_SFT_NUMA"})
# Names that meant the same as another variable: an error that names the one to use.
REMOVED_ENV = {"KT_SFT_THREADS": "KT_SFT_NUM_THREADS"}


def env_name(field: str) -> str:
    """The environment variable of a KTConfig field."""
    return ENV_NAMES.get(field, ENV_PREFIX + field.upper())


class KTConfigError(ValueError):
    """A configuration value or key that kt-sft cannot accept."""


@dataclass(frozen=True)
class KTConfig:
    """Configuration of the CPU experts.

    backend: "kernels" (kt_sft_kernels, the default) or "reference" (plain PyTorch, for checking).
    threads: kernel worker threads; None = the kernel default (physical cores of the affinity mask).
    numa_shards: tensor-parallel shards of each experts layer over NUMA nodes (ADR 0701): a count, or
        "auto" = one per NUMA node with usable cores (kt_sft_kernels.shard_layout(); KT_SFT_NUMA
        overrides the layout). int8 / int4 bases are sharded too (int4: every shard holds whole groups,
        so numa_shards can be at most intermediate / group_size).
    weight_dtype: frozen base expert weights in the kernels: "bf16", "int8" (per output channel) or
        "int4" (group-wise); quantized while loading, or taken as shipped from an int4 checkpoint.
    group_size: int4 group size (32, 64 or 128); None = the checkpoint's own groups for an int4
        checkpoint, else the largest of 128/64/32 that divides hidden and intermediate.
    quantized_cache: a directory for int8 / int4 expert bases quantized from a bf16 / fp8 checkpoint:
        the first load writes each layer's quantized weights there, later loads of the same checkpoint
        read them back bit-exactly instead of quantizing again (ADR 0604). None = no cache; unused for
        bf16 bases and for checkpoints that ship int4.
    activation_policy: under gradient checkpointing, "retain" keeps the CPU activation caches of the
        first forward for the backward; "recompute" re-runs the CPU forward during the backward.
    max_isa: cap on the kernel ISA tier (None = best the CPU supports).
    distributed: "none" (one process owns its experts) or "host_owner" (one process per host owns them and
        runs them for the other ranks of its host; see kt_sft_train.distributed and docs/distributed.md).
    owner_local_rank: with host_owner, the local rank (index among the host's ranks) that owns the experts.
    hosts: with host_owner, the global ranks of each host, e.g. ((0, 1), (2, 3)); None = from torchrun's
        GROUP_RANK (or the host name). Explicit hosts let tests simulate several hosts on one machine.
    distributed_timeout_s: with host_owner, the longest any rank waits for another in an exchange.
    exchange_transport: with host_owner, how the payloads move inside a host: "shm" (shared-memory
        mailboxes in /dev/shm, gloo for the small headers; measured faster, ADR 0801) or "gloo".
    pin_memory: stage GPU<->CPU copies through pinned host buffers (only used with CUDA tensors).
    """

    backend: str = "kernels"
    threads: int | None = None
    numa_shards: int | str = 1
    weight_dtype: str = "bf16"
    group_size: int | None = None
    quantized_cache: str | None = None
    activation_policy: str = "retain"
    max_isa: str | None = None
    distributed: str = "none"
    owner_local_rank: int = 0
    hosts: tuple[tuple[int, ...], ...] | None = None
    distributed_timeout_s: float = 600.0
    exchange_transport: str = "shm"
    pin_memory: bool = True

    def __post_init__(self) -> None:
        _check_choice("backend", self.backend, BACKENDS)
        if self.threads is not None:
            _check_positive_int("threads", self.threads)
        if self.numa_shards != "auto":
            _check_positive_int("numa_shards", self.numa_shards, also="or 'auto'")
        _check_choice("weight_dtype", self.weight_dtype, WEIGHT_DTYPES)
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or self.group_size not in GROUP_SIZES
        ):
            raise KTConfigError(f"KTConfig.group_size={self.group_size!r} is not one of {list(GROUP_SIZES)}")
        if isinstance(self.quantized_cache, os.PathLike):
            object.__setattr__(self, "quantized_cache", os.fspath(self.quantized_cache))
        cache = self.quantized_cache
        if cache is not None and (not isinstance(cache, str) or not cache):
            raise KTConfigError(
                f"KTConfig.quantized_cache must be a directory path or None, got {self.quantized_cache!r}"
            )
        _check_choice("activation_policy", self.activation_policy, ACTIVATION_POLICIES)
        if self.max_isa is not None:
            _check_choice("max_isa", self.max_isa, ISA_TIERS)
        _check_choice("distributed", self.distributed, DISTRIBUTED_MODES)
        _check_choice("exchange_transport", self.exchange_transport, EXCHANGE_TRANSPORTS)
        _check_distributed(self)
        if not isinstance(self.pin_memory, bool):
            raise KTConfigError(f"KTConfig.pin_memory must be a bool, got {self.pin_memory!r}")

    # -- constructors -------------------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> KTConfig:
        """Build from a mapping (e.g. a YAML section); `kt_`-prefixed upstream names are accepted."""
        if not isinstance(mapping, Mapping):
            raise KTConfigError(f"KTConfig.from_mapping expects a mapping, got {type(mapping).__name__}")
        return cls(**_canonical_kwargs(mapping))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> KTConfig:
        """Build from a YAML file holding a mapping (top level, or under a `kt:`/`kt_config:` key)."""
        import yaml

        text = Path(path).read_text(encoding="utf-8")
        data = yaml.safe_load(text)
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise KTConfigError(f"{path}: expected a YAML mapping, got {type(data).__name__}")
        for section in ("kt", "kt_config"):
            if set(data) == {section}:
                data = data[section] or {}
        return cls.from_mapping(data)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KTConfig:
        """Build from the KT_SFT_* environment variables (e.g. KT_SFT_NUM_THREADS=32, KT_SFT_BACKEND=...)."""
        try:
            return cls(**env_values(environ))
        except KTConfigError as error:
            raise KTConfigError(f"{error} (from the KT_SFT_* environment variables)") from None

    def replace(self, **changes: Any) -> KTConfig:
        """A copy with some fields changed (validated like a new config)."""
        merged = asdict(self)
        merged.update(_canonical_kwargs(changes))
        return type(self)(**merged)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def env_values(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The KTConfig fields set by KT_SFT_* environment variables (only those set), parsed.

    An unknown or removed KT_SFT_* variable is an error naming the right one.
    """
    env = os.environ if environ is None else environ
    by_var = {env_name(f.name): f.name for f in fields(KTConfig)}
    values: dict[str, Any] = {}
    for var, raw in env.items():
        if not var.startswith(ENV_PREFIX) or var in KERNEL_ONLY_ENV:
            continue
        if var in REMOVED_ENV:
            raise KTConfigError(
                f"{var} is no longer read: the same setting is {REMOVED_ENV[var]} (see docs/environment.md)"
            )
        if var not in by_var:
            known = sorted([*by_var, *KERNEL_ONLY_ENV])
            raise KTConfigError(f"unknown environment variable {var}{_suggestion(var, known)}")
        values[by_var[var]] = _parse_env_value(var, by_var[var], raw)
    return values


# -- validation helpers ---------------------------------------------------------------------------------


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        hint = _suggestion(value, list(choices)) if isinstance(value, str) else ""
        raise KTConfigError(f"KTConfig.{name}={value!r} is not one of {list(choices)}{hint}")


def _check_positive_int(name: str, value: Any, also: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        what = f"a positive integer {also}".strip()
        raise KTConfigError(f"KTConfig.{name} must be {what}, got {value!r}")


def _check_distributed(config: KTConfig) -> None:
    owner = config.owner_local_rank
    if isinstance(owner, bool) or not isinstance(owner, int) or owner < 0:
        raise KTConfigError(f"KTConfig.owner_local_rank must be a non-negative integer, got {owner!r}")
    timeout = config.distributed_timeout_s
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise KTConfigError(f"KTConfig.distributed_timeout_s must be a positive number, got {timeout!r}")
    if config.hosts is not None:
        object.__setattr__(config, "hosts", _normalized_hosts(config.hosts))
    if config.distributed == "none" and (owner != 0 or config.hosts is not None):
        raise KTConfigError(
            "KTConfig.owner_local_rank and KTConfig.hosts only apply with distributed='host_owner'"
        )


def _normalized_hosts(hosts: Any) -> tuple[tuple[int, ...], ...]:
    problem = f"KTConfig.hosts must be a list of lists of global ranks, e.g. [[0, 1], [2, 3]], got {hosts!r}"
    if isinstance(hosts, (str, bytes)) or not isinstance(hosts, (list, tuple)) or not hosts:
        raise KTConfigError(problem)
    normalized: list[tuple[int, ...]] = []
    for host in hosts:
        if isinstance(host, (str, bytes)) or not isinstance(host, (list, tuple)) or not host:
            raise KTConfigError(problem)
        if any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in host):
            raise KTConfigError(problem)
        normalized.append(tuple(sorted(host)))
    ranks = [r for host in normalized for r in host]
    if len(set(ranks)) != len(ranks):
        raise KTConfigError(f"KTConfig.hosts names a rank twice: {hosts!r}")
    if sorted(ranks) != list(range(len(ranks))):
        raise KTConfigError(f"KTConfig.hosts must name every rank 0..N-1 exactly once, got {hosts!r}")
    return tuple(sorted(normalized))


def _suggestion(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# -- upstream (kt-kernel / LLaMA-Factory) aliases ---------------------------------------------------------

_UPSTREAM_WEIGHT_FORMATS = {
    "amxbf16": "bf16",
    "avx512bf16": "bf16",
    "bf16": "bf16",
    "amxint8": "int8",
    "int8": "int8",
    "amxint4": "int4",
    "rawint4": "int4",  # upstream's name for natively int4 checkpoints (Kimi-K2 class)
    "int4": "int4",
}


def _upstream_backend(value: Any) -> dict[str, Any]:
    # Upstream `kt_backend` names the kernel weight format (AMXBF16, AMXINT8, ...); ours names the
    # implementation. Accept both spellings.
    if isinstance(value, str) and value in BACKENDS:
        return {"backend": value}
    if isinstance(value, str) and value.lower() in _UPSTREAM_WEIGHT_FORMATS:
        return {"weight_dtype": _UPSTREAM_WEIGHT_FORMATS[value.lower()]}
    if isinstance(value, str) and value.lower() == "auto":
        return {}
    raise KTConfigError(
        f"kt_backend={value!r} is not understood; use one of {list(BACKENDS)} or an upstream weight "
        f"format {sorted({k.upper() for k in _UPSTREAM_WEIGHT_FORMATS if k.startswith('amx')})}"
    )


def _upstream_weight_dtype(value: Any) -> dict[str, Any]:
    # kt_weight_dtype takes our names and the upstream spellings (AMXINT8, amxint4, BF16, ...).
    if isinstance(value, str) and value.lower() in _UPSTREAM_WEIGHT_FORMATS:
        return {"weight_dtype": _UPSTREAM_WEIGHT_FORMATS[value.lower()]}
    return {"weight_dtype": value}  # validated (with a suggestion) by KTConfig


def _upstream_tp(value: Any) -> dict[str, Any]:
    # Resolved in _canonical_kwargs after the other keys: True makes numa_shards default to "auto"
    # (kt-kernel's TP wrapper: one pool per NUMA node), False to 1; kt_threadpool_count / numa_shards
    # given alongside set the count.
    if not isinstance(value, bool):
        raise KTConfigError(f"kt_tp_enabled must be true or false, got {value!r}")
    return {}


def _upstream_gpu_experts(value: Any) -> dict[str, Any]:
    if value:
        raise NotImplementedError(
            f"{value!r} experts on the GPU: GPU-resident experts are not implemented yet"
        )
    return {}


def _upstream_lora_experts(value: Any) -> dict[str, Any]:
    if value:
        raise NotImplementedError(
            "extra trainable GPU 'LoRA experts' (kt_use_lora_experts) are not implemented yet"
        )
    return {}


def _rename(field: str) -> Callable[[Any], dict[str, Any]]:
    return lambda value: {field: value}


_ALIASES: dict[str, Callable[[Any], dict[str, Any]]] = {
    "kt_backend": _upstream_backend,
    "kt_method": _upstream_backend,
    "kt_expert_weight_format": _upstream_backend,
    "kt_num_threads": _rename("threads"),
    "kt_threads": _rename("threads"),
    "kt_threadpool_count": _rename("numa_shards"),
    "kt_numa_shards": _rename("numa_shards"),
    "kt_tp_enabled": _upstream_tp,
    "kt_cpu_activation": _rename("activation_policy"),
    "kt_activation_policy": _rename("activation_policy"),
    "kt_weight_dtype": _upstream_weight_dtype,
    "kt_group_size": _rename("group_size"),
    "kt_max_isa": _rename("max_isa"),
    "kt_num_gpu_experts": _upstream_gpu_experts,
    "kt_use_lora_experts": _upstream_lora_experts,
}

# Upstream keys with no meaning here: say why instead of a bare "unknown key".
_RETIRED = {
    "kt_max_cache_depth": "activation caches are owned by each forward call, there is no cache depth",
    "kt_share_backward_bb": "the backward reads the packed forward weights, there is nothing to share",
    "kt_share_cache_pool": "activation caches are owned by each forward call, there is no pool",
    "kt_lora_rank": "the LoRA rank comes from peft.LoraConfig(r=...)",
    "kt_lora_alpha": "the LoRA alpha comes from peft.LoraConfig(lora_alpha=...)",
    "kt_skip_expert_loading": "load_kt_model always streams experts into the kernels",
    "kt_model_max_length": "activation buffers are sized per call",
    "kt_chunked_prefill_size": "activation buffers are sized per call",
    "kt_weight_path": "kt-sft quantizes the model's own bf16 / fp8 checkpoint while loading (no offline "
    "conversion; int4 checkpoints are read as shipped), and quantized_cache keeps the result for later runs",
}


def canonical_kwargs(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """`mapping` with upstream `kt_` aliases turned into KTConfig field names (unknown keys rejected)."""
    return _canonical_kwargs(mapping)


def _canonical_kwargs(mapping: Mapping[str, Any]) -> dict[str, Any]:
    names = [f.name for f in fields(KTConfig)]
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise KTConfigError(f"KTConfig keys must be strings, got {key!r}")
        if key in names:
            updates = {key: value}
        elif key in _ALIASES:
            updates = _ALIASES[key](value)
        elif key in _RETIRED:
            raise KTConfigError(f"KTConfig key {key!r} is not used by kt-sft: {_RETIRED[key]}; remove it")
        else:
            candidates = names + list(_ALIASES)
            raise KTConfigError(f"unknown KTConfig key {key!r}{_suggestion(key, candidates)}")
        for name, new in updates.items():
            if name in out and out[name] != new:
                raise KTConfigError(
                    f"KTConfig.{name} is given twice with different values ({out[name]!r}, {new!r})"
                )
            out[name] = new
    tp = mapping.get("kt_tp_enabled")
    if tp is True:
        out.setdefault("numa_shards", "auto")
    elif tp is False and out.get("numa_shards", 1) != 1:
        raise KTConfigError(
            f"kt_tp_enabled=False contradicts numa_shards={out['numa_shards']!r} (kt_threadpool_count); "
            "drop one of them"
        )
    return out


def _parse_env_value(var: str, name: str, raw: str) -> Any:
    text = raw.strip()
    if name == "group_size" and text.lower() in ("", "none", "auto"):
        return None
    if name == "quantized_cache" and not text:
        return None
    if name == "hosts":
        # KT_SFT_HOSTS="0,1;2,3": hosts separated by ';', ranks by ','.
        try:
            return [[int(r) for r in host.split(",")] for host in text.split(";")]
        except ValueError:
            raise KTConfigError(f"{var}={raw!r} is not a host list like '0,1;2,3'") from None
    if name == "distributed_timeout_s":
        try:
            return float(text)
        except ValueError:
            raise KTConfigError(f"{var}={raw!r} is not a number of seconds") from None
    if name in ("threads", "numa_shards", "group_size", "owner_local_rank"):
        # 0 / unset: the kernel default (physical cores), as the kernel wheel reads KT_SFT_NUM_THREADS.
        if name == "threads" and text.lower() in ("", "0", "auto", "none"):
            return None
        if name == "numa_shards" and text.lower() == "auto":
            return "auto"
        try:
            return int(text)
        except ValueError:
            raise KTConfigError(f"{var}={raw!r} is not an integer") from None
    if name == "pin_memory":
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise KTConfigError(f"{var}={raw!r} is not a boolean (use 1/0, true/false)")
    if name == "max_isa" and text.lower() in ("", "none", "auto"):
        return None
    return text
