"""Resumable checkpoints of a run (checkpoints/step-NNNNNN/: adapter/, optimizer.pt, rng.pt, state.json)
and the checks that a --resume continues the same run on the same base model."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .options import RESUME_INVARIANTS, OptionsError, TrainOptions

CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "step-"


def latest_checkpoint(output: Path) -> Path | None:
    root = output / CHECKPOINTS
    if not root.is_dir():
        return None
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    found = [p for p in found if (p / "state.json").is_file()]
    return max(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)), default=None)


def check_resume_compatible(output: Path, options: TrainOptions) -> None:
    run_file = output / "run.json"
    if not run_file.is_file():
        raise OptionsError(f"--resume: {run_file} is missing, so the previous run's options are unknown")
    previous = json.loads(run_file.read_text(encoding="utf-8"))["options"]
    changed = [name for name in RESUME_INVARIANTS if previous.get(name) != getattr(options, name)]
    if changed:
        details = ", ".join(f"{n}: {previous.get(n)!r} -> {getattr(options, n)!r}" for n in changed)
        raise OptionsError(f"--resume: the checkpoint was trained with other options ({details})")


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


# Config keys that say how a model was loaded or saved, not what it is.
_NOT_ARCHITECTURE = {"transformers_version", "dtype", "torch_dtype", "architectures", "use_cache"}


def base_model_description(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint's adapter and optimizer state were trained on: the base's architectural config
    and its expert shapes (recorded in state.json, compared before a resume touches the model)."""
    from ..arch import get_moe_arch_config

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = {
        key: value
        for key, value in base.config.to_dict().items()
        if not key.startswith("_") and key not in _NOT_ARCHITECTURE
    }
    arch = get_moe_arch_config(base)
    experts = {
        "layers": len(arch.layers),
        "experts": arch.num_experts,
        "hidden": arch.hidden_size,
        "intermediate": arch.intermediate_size,
    }
    # JSON round trip: the comparison sees what state.json stores (lists for tuples, ...).
    return json.loads(json.dumps({"config": config, "experts": experts}, default=str))


def check_checkpoint_base(checkpoint: Path, model: nn.Module) -> None:
    """Raise OptionsError naming what differs when `checkpoint` was trained on another base model."""
    recorded = json.loads((checkpoint / "state.json").read_text(encoding="utf-8")).get("base_model")
    if recorded is None:
        return  # a checkpoint of an older kt-sft: the adapter's keys and shapes are still validated
    current = base_model_description(model)
    differences = []
    for section in ("experts", "config"):
        before, now = recorded.get(section, {}), current[section]
        for key in sorted(set(before) | set(now)):
            if before.get(key) != now.get(key):
                differences.append(f"{key}: {before.get(key)!r} -> {now.get(key)!r}")
    if differences:
        shown = ", ".join(differences[:5]) + (
            f" and {len(differences) - 5} more" if len(differences) > 5 else ""
        )
        raise OptionsError(f"--resume: {checkpoint} was trained on another base model ({shown})")


@dataclass
class FullState:
    """The adapter's and the optimizer's tensors gathered from FSDP2's shards (every rank gathers)."""

    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]


def full_adapter_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Under FSDP2, the adapter's tensors gathered (a collective: call it on every rank); None when
    nothing is sharded (save_pretrained then reads the model directly)."""
    from ..distributed import full_state_dict
    from ..sharded_state import is_sharded

    return full_state_dict(model, lambda name: "lora_" in name) if is_sharded(model) else None


def gather_full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> FullState | None:
    """Under FSDP2, the full state that save_checkpoint writes (a collective: call it on every rank)."""
    from ..sharded_state import full_optimizer_state

    adapter = full_adapter_state(model)
    return None if adapter is None else FullState(adapter, full_optimizer_state(optimizer))


def save_checkpoint(
    output: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    keep: int,
    full: FullState | None = None,
) -> Path:
    from ..adapters import atomic_directory

    target = output / CHECKPOINTS / f"{CHECKPOINT_PREFIX}{step:06d}"
    with atomic_directory(target) as staging:
        if full is None:
            model.save_pretrained(staging / "adapter")
            torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        else:
            model.save_pretrained(staging / "adapter", state_dict=full.adapter)
            torch.save(full.optimizer, staging / "optimizer.pt")
        torch.save(_rng_state(), staging / "rng.pt")
        state = {
            "step": step,
            "parameters": [name for name, _ in trainable_parameters(model)],
            "base_model": base_model_description(model),
        }
        (staging / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    checkpoints = sorted(
        (p for p in (output / CHECKPOINTS).iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)),
        key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)),
    )
    for old in checkpoints[:-keep]:
        shutil.rmtree(old)
    return target


def load_checkpoint(checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore adapter weights, optimizer state and RNG from `checkpoint`; returns its step."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from ..adapters import ADAPTER_WEIGHTS, validate_adapter
    from ..sharded_state import is_sharded, shard_like, shard_optimizer_state

    state = json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))
    names = [name for name, _ in trainable_parameters(model)]
    saved: list[str] = state["parameters"]
    # A non-owner rank of a distributed run trains the saved parameters minus the expert LoRA.
    if saved != names and not (_is_host_owner_proxy(model) and set(names) < set(saved)):
        raise OptionsError(f"--resume: {checkpoint} holds other trainable parameters than this model")
    validate_adapter(model, checkpoint / "adapter")
    weights = load_file(checkpoint / "adapter" / ADAPTER_WEIGHTS)
    if saved != names:
        weights = {k: v for k, v in weights.items() if not _is_expert_lora_key(model, k)}
    sharded = is_sharded(model)
    if sharded:  # FSDP2: each rank keeps its shard of the full tensors
        by_key = {name.replace(".default.", "."): p for name, p in model.named_parameters()}
        weights = {k: shard_like(v, by_key[k]) if k in by_key else v for k, v in weights.items()}
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise OptionsError(f"--resume: {checkpoint} adapter has keys the model lacks: {unexpected[:3]}")
    optimizer_state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    if saved != names:
        optimizer_state = _optimizer_state_subset(optimizer_state, saved, names)
    if sharded:
        optimizer_state = shard_optimizer_state(optimizer_state, optimizer)
    optimizer.load_state_dict(optimizer_state)
    _set_rng_state(torch.load(checkpoint / "rng.pt", weights_only=False))
    return int(state["step"])


def _is_host_owner_proxy(model: nn.Module) -> bool:
    from .. import distributed

    runtime = distributed.current_runtime()
    return runtime is not None and not runtime.layout.is_owner


def _is_expert_lora_key(model: nn.Module, key: str) -> bool:
    from .. import distributed

    names = {name.replace(".default.", ".") for name in distributed.expert_lora_parameters(model)}
    return key in names


def _optimizer_state_subset(state: dict[str, Any], saved: list[str], names: list[str]) -> dict[str, Any]:
    """The saved optimizer state (one group, parameters in `saved` order) restricted to `names`."""
    keep = [saved.index(name) for name in names]
    (group,) = state["param_groups"]
    return {
        "state": {new: state["state"][old] for new, old in enumerate(keep) if old in state["state"]},
        "param_groups": [dict(group, params=list(range(len(keep))))],
    }
