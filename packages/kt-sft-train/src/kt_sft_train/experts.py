"""KTExperts: the drop-in replacement of a model's routed-experts module, running on the CPU.

It holds a kernel layer (or the reference layer) with the packed expert weights, and two zero-storage
placeholder parameters with the original shapes (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`) so
that PEFT `target_parameters` can target them. `_apply` is a no-op: `model.to(...)`, `.half()`,
accelerate's `prepare` never move or cast the CPU experts or materialize the placeholders.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from .arch import MOEArchConfig, UnsupportedModelError, experts_top_k, get_moe_arch_config, layout_problems
from .autograd import ExpertsLayer, moe_experts_apply
from .checkpointing import install_checkpoint_regions
from .config import KTConfig
from .reference import ExpertLoRA, ReferenceLayer

_experts_created_hooks: list[Callable[[], None]] = []


def add_experts_created_hook(hook: Callable[[], None]) -> None:
    """Call `hook()` whenever a KTExperts is built (kt_sft_train.peft installs its PEFT takeover so).

    Integrations extend KTExperts through this hook instead of experts.py importing them.
    """
    if hook not in _experts_created_hooks:
        _experts_created_hooks.append(hook)


def zero_storage_placeholder(shape: tuple[int, ...], dtype: torch.dtype) -> nn.Parameter:
    """A frozen parameter of `shape` whose storage is a single element (every stride is 0)."""
    return nn.Parameter(torch.zeros((), dtype=dtype).expand(shape), requires_grad=False)


def make_layer(
    kt: KTConfig, num_experts: int, top_k: int, hidden: int, intermediate: int, name: str = ""
) -> ExpertsLayer:
    def build() -> ExpertsLayer:
        if kt.backend == "reference":
            if kt.weight_dtype != "bf16":
                raise NotImplementedError(
                    "not implemented yet: KTConfig(backend='reference', "
                    f"weight_dtype={kt.weight_dtype!r}); the reference experts keep the checkpoint's weights "
                    "(use backend='kernels' for int8/int4)"
                )
            return ReferenceLayer(num_experts, top_k, hidden, intermediate)
        from ._kernels import KernelLayer

        return KernelLayer(num_experts, top_k, hidden, intermediate, kt)

    if kt.distributed == "host_owner":
        from .distributed import host_owner_layer

        return host_owner_layer(kt, build, top_k, f"KTExperts {name}" if name else "")
    return build()


class KTExperts(nn.Module):
    """Routed experts on the CPU with the call convention of transformers' experts modules."""

    def __init__(
        self,
        *,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        kt: KTConfig | None = None,
        dtype: torch.dtype = torch.bfloat16,
        name: str = "",
    ) -> None:
        super().__init__()
        for arg, value in (
            ("num_experts", num_experts),
            ("top_k", top_k),
            ("hidden_size", hidden_size),
            ("intermediate_size", intermediate_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"KTExperts {arg} must be a positive integer, got {value!r}")
        if top_k > num_experts:
            raise ValueError(f"KTExperts top_k={top_k} is larger than num_experts={num_experts}")
        if not dtype.is_floating_point:
            raise TypeError(f"KTExperts dtype must be a floating dtype, got {dtype}")
        self.kt = kt if kt is not None else KTConfig()
        self.name = name
        self.num_experts = num_experts
        self.top_k = top_k
        self.hidden_dim = hidden_size
        self.intermediate_dim = intermediate_size
        # The layout flags of transformers' experts modules: PEFT reads is_transposed, detection reads all.
        self.has_gate = True
        self.has_bias = False
        self.is_transposed = False
        self.is_concatenated = True
        self.act_fn = nn.SiLU()
        self.gate_up_proj = zero_storage_placeholder((num_experts, 2 * intermediate_size, hidden_size), dtype)
        self.down_proj = zero_storage_placeholder((num_experts, hidden_size, intermediate_size), dtype)
        self.layer = make_layer(self.kt, num_experts, top_k, hidden_size, intermediate_size, name)
        # A host-owner proxy has no weights to load: its host's owner runs the experts.
        self.weights_loaded = not self.owns_experts
        for hook in tuple(_experts_created_hooks):
            hook()

    @classmethod
    def from_arch(
        cls,
        arch: MOEArchConfig,
        kt: KTConfig | None = None,
        *,
        dtype: torch.dtype | None = None,
        name: str = "",
    ) -> KTExperts:
        """An empty KTExperts for one MoE layer of `arch` (load its weights with load_expert_weights)."""
        return cls(
            num_experts=arch.num_experts,
            top_k=arch.top_k,
            hidden_size=arch.hidden_size,
            intermediate_size=arch.intermediate_size,
            kt=kt,
            dtype=arch.dtype if dtype is None else dtype,
            name=name,
        )

    @classmethod
    def from_weights(
        cls,
        hf_experts: nn.Module,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        kt: KTConfig | None = None,
        *,
        name: str = "",
    ) -> KTExperts:
        """A loaded KTExperts replacing `hf_experts` (any device, meta included: only its layout is read).

        Both backends copy gate_up/down (the kernels pack them), so the caller may drop them right after.
        """
        experts = cls.like(hf_experts, kt, name=name)
        experts.load_expert_weights(gate_up, down)
        return experts

    @classmethod
    def like(cls, hf_experts: nn.Module, kt: KTConfig | None = None, *, name: str = "") -> KTExperts:
        """An empty KTExperts with the layout of `hf_experts` (any device, meta included)."""
        problems = layout_problems(hf_experts)
        if problems:
            label = name or type(hf_experts).__name__
            raise UnsupportedModelError(
                f"kt-sft cannot run the routed experts at {label}: " + "; ".join(problems)
            )
        num_experts, two_i, hidden = hf_experts.gate_up_proj.shape
        return cls(
            num_experts=int(num_experts),
            top_k=experts_top_k(hf_experts),
            hidden_size=int(hidden),
            intermediate_size=int(two_i) // 2,
            kt=kt,
            dtype=hf_experts.gate_up_proj.dtype,
            name=name,
        )

    def load_quantized_weights(
        self,
        gate_up_q: torch.Tensor,
        gate_up_scale: torch.Tensor,
        down_q: torch.Tensor,
        down_scale: torch.Tensor,
    ) -> None:
        """Load a pre-quantized int8/int4 base bit-exactly (layout: kt_sft_train.quantization)."""
        self.layer.load_quantized(gate_up_q, gate_up_scale, down_q, down_scale)  # type: ignore[attr-defined]
        self.weights_loaded = True

    @property
    def backend(self) -> str:
        return self.layer.backend

    @property
    def owns_experts(self) -> bool:
        """False on the non-owner ranks of a host-owner run (the layer is a proxy of the owner's)."""
        layer = self.layer
        while not hasattr(layer, "owns_experts") and hasattr(layer, "inner"):  # under proxies (timing)
            layer = layer.inner
        return bool(getattr(layer, "owns_experts", True))

    def load_expert_weights(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """Copy in this layer's weights (gate_up [E, 2I, H], down [E, H, I]); the caller may free them."""
        expected = {
            "gate_up": (self.num_experts, 2 * self.intermediate_dim, self.hidden_dim),
            "down": (self.num_experts, self.hidden_dim, self.intermediate_dim),
        }
        for arg, tensor in (("gate_up", gate_up), ("down", down)):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{self._label()}: {arg} must be a torch.Tensor, got {type(tensor).__name__}")
            if tuple(tensor.shape) != expected[arg]:
                raise ValueError(
                    f"{self._label()}: {arg} must have shape {list(expected[arg])}, got {list(tensor.shape)}"
                )
            if not tensor.dtype.is_floating_point:
                raise TypeError(f"{self._label()}: {arg} must be a floating tensor, got {tensor.dtype}")
            if tensor.device.type == "meta":
                raise ValueError(f"{self._label()}: {arg} is on the meta device (no data to load)")
        self.layer.load_weights(gate_up, down)
        self.weights_loaded = True

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if parametrize.is_parametrized(self):
            raise RuntimeError(
                f"{self._label()}: a PEFT wrapper parametrized the expert weights instead of handing its "
                "LoRA to kt-sft; call kt_sft_train.take_over_peft_wrappers(model) after get_peft_model"
            )
        return self.run(hidden_states, top_k_index, top_k_weights, None)

    def run(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        lora: ExpertLoRA | None,
    ) -> torch.Tensor:
        """The experts with optional expert LoRA (kernel layout, see reference.ExpertLoRA)."""
        if not self.weights_loaded:
            raise RuntimeError(f"{self._label()}: expert weights are not loaded (load_expert_weights)")
        self._check_inputs(hidden_states, top_k_index, top_k_weights)
        shape = hidden_states.shape
        out = moe_experts_apply(
            self.layer,
            self,
            hidden_states.reshape(-1, self.hidden_dim),
            top_k_index.reshape(-1, self.top_k),
            top_k_weights.reshape(-1, self.top_k),
            lora,
            policy=self.kt.activation_policy,
            pin_memory=self.kt.pin_memory,
        )
        return out.view(shape)

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The gate the kernels compute (what transformers' default `_apply_gate` computes)."""
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # The experts, their placeholders and (through the PEFT take-over) their LoRA stay on the CPU.
        return self

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, top_k={self.top_k}, hidden={self.hidden_dim}, "
            f"intermediate={self.intermediate_dim}, backend={self.backend!r}, loaded={self.weights_loaded}"
        )

    def _label(self) -> str:
        return f"KTExperts {self.name}" if self.name else "KTExperts"

    def _check_inputs(self, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        # Not a copy of the kernel's validation: these are the caller's [..., H] / [..., top_k] tensors
        # before they are flattened (a wrong ids shape with the right element count would reshape into a
        # valid-looking [T, top_k]) and before staging casts the weights to the host dtype (integer
        # weights would pass silently); they also guard the reference backend, which has no kernel.
        if hidden.shape[-1] != self.hidden_dim:
            raise ValueError(
                f"{self._label()}: hidden_states last dim must be {self.hidden_dim}, "
                f"got {tuple(hidden.shape)}"
            )
        tokens = hidden.numel() // self.hidden_dim
        if ids.shape[-1] != self.top_k or ids.numel() != tokens * self.top_k:
            raise ValueError(
                f"{self._label()}: top_k_index must be [T, {self.top_k}] for T={tokens} tokens, "
                f"got {tuple(ids.shape)}"
            )
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"{self._label()}: top_k_index must be an integer tensor, got {ids.dtype}")
        if tuple(weights.shape) != tuple(ids.shape):
            raise ValueError(
                f"{self._label()}: top_k_weights must have the shape of top_k_index {tuple(ids.shape)}, "
                f"got {tuple(weights.shape)}"
            )
        if not weights.dtype.is_floating_point:
            raise TypeError(f"{self._label()}: top_k_weights must be floating, got {weights.dtype}")


def replace_module(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put `new` at `path` of `model` and return what was there."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def attach_kt(model: nn.Module, experts: list[KTExperts]) -> None:
    """Model-level setup once its experts are KTExperts: checkpoint regions, upstream-style bookkeeping."""
    install_checkpoint_regions(model)
    model.__dict__["_kt_wrappers"] = list(experts)


def wrap_moe_layers_with_kt_wrapper(model: nn.Module, kt: KTConfig | None = None) -> list[KTExperts]:
    """Replace every routed-experts module of a built model by a KTExperts holding a copy of its weights.

    The original expert tensors are released as each layer is replaced (peak: model + one layer).
    Call this before `get_peft_model`. Returns the KTExperts in model order (upstream's name and result).
    """
    kt = kt if kt is not None else KTConfig()
    _refuse_multi_rank(kt)
    arch = get_moe_arch_config(model)
    wrapped: list[KTExperts] = []
    for layer in arch.layers:
        current = model.get_submodule(layer.experts_path)
        if isinstance(current, KTExperts):
            raise ValueError(f"{layer.experts_path} is already a KTExperts (the model was wrapped before)")
        if not _is_plain_experts(current):
            raise ValueError(
                f"{layer.experts_path} is wrapped by {type(current).__name__}: call "
                "wrap_moe_layers_with_kt_wrapper before get_peft_model"
            )
        experts = KTExperts.from_arch(arch, kt, dtype=current.gate_up_proj.dtype, name=layer.experts_path)
        experts.load_expert_weights(current.gate_up_proj.detach(), current.down_proj.detach())
        replace_module(model, layer.experts_path, experts)
        wrapped.append(experts)
    attach_kt(model, wrapped)
    return wrapped


def _is_plain_experts(module: nn.Module) -> bool:
    gate_up = module._parameters.get("gate_up_proj") if hasattr(module, "_parameters") else None
    return isinstance(gate_up, torch.Tensor) and "base_layer" not in module._modules


def _refuse_multi_rank(kt: KTConfig) -> None:
    distributed = torch.distributed
    if kt.distributed != "none":
        return
    if distributed.is_available() and distributed.is_initialized() and distributed.get_world_size() > 1:
        raise ValueError(
            "several ranks with KTConfig(distributed='none') would each hold a full copy of the CPU experts; "
            "use KTConfig(distributed='host_owner') (one expert owner per host)"
        )
