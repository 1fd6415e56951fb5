"""The routed-experts math of DESIGN.md §2 in plain PyTorch: the oracle and the `backend="reference"` layer.

`moe_forward` runs on any device and is differentiable in everything (autograd gives the backward of
§2). `ReferenceLayer` wraps it behind the same small interface as the kernel layer (load weights,
forward with a saved handle, backward consuming the handle), so every piece of the training wheel above
it (staging, autograd function, checkpoint regions, PEFT take-over) runs the same way on both backends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass
class ExpertLoRA:
    """Expert LoRA factors in the kernel layout; a projection without LoRA has (None, None).

    a_gu [E, r, H], b_gu [E, 2I, r], a_d [E, r, I], b_d [E, H, r]:
        gu = W_gu[e] x + scale_gu * b_gu[e] (a_gu[e] x),  y = W_d[e] h + scale_d * b_d[e] (a_d[e] h).
    """

    a_gu: torch.Tensor | None = None
    b_gu: torch.Tensor | None = None
    a_d: torch.Tensor | None = None
    b_d: torch.Tensor | None = None
    scale_gu: float = 1.0
    scale_d: float = 1.0

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.a_gu, self.b_gu, self.a_d, self.b_d)

    def replace_tensors(self, tensors: tuple[torch.Tensor | None, ...]) -> ExpertLoRA:
        a_gu, b_gu, a_d, b_d = tensors
        return ExpertLoRA(a_gu, b_gu, a_d, b_d, self.scale_gu, self.scale_d)


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any input is float64 (the oracle), else float32 (every accumulation in fp32)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def moe_forward(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    lora: ExpertLoRA | None = None,
) -> torch.Tensor:
    """out[t] = sum_j weights[t,j] * expert_{ids[t,j]}(x[t]), in x's dtype; ids outside [0, E) are skipped.

    x [T, H], ids [T, k] integer, weights [T, k], gate_up [E, 2I, H], down [E, H, I].
    """
    _check_shapes(x, ids, weights, gate_up, down, lora)
    num_tokens, hidden = x.shape
    top_k = ids.shape[1]
    num_experts, two_i, _ = gate_up.shape
    intermediate = two_i // 2
    lora = lora or ExpertLoRA()
    dtype = compute_dtype(x, weights, gate_up, down, *lora.tensors())

    xc = x.to(dtype)
    flat_ids = ids.reshape(-1).to(device=x.device, dtype=torch.long)
    valid = (flat_ids >= 0) & (flat_ids < num_experts)
    # One output row per (token, slot) pair, so the weighted sum below runs in a fixed slot order.
    pair_out = xc.new_zeros(num_tokens * top_k, hidden)
    for expert in torch.unique(flat_ids[valid]).tolist():
        pairs = torch.nonzero(flat_ids == expert).squeeze(1)
        xe = xc.index_select(0, pairs // top_k)
        gu = xe @ gate_up[expert].to(dtype).T
        if lora.a_gu is not None and lora.b_gu is not None:
            gu = gu + lora.scale_gu * ((xe @ lora.a_gu[expert].to(dtype).T) @ lora.b_gu[expert].to(dtype).T)
        gate, up = gu[:, :intermediate], gu[:, intermediate:]
        h = F.silu(gate) * up
        ye = h @ down[expert].to(dtype).T
        if lora.a_d is not None and lora.b_d is not None:
            ye = ye + lora.scale_d * ((h @ lora.a_d[expert].to(dtype).T) @ lora.b_d[expert].to(dtype).T)
        pair_out = pair_out.index_copy(0, pairs, ye)
    weighted = pair_out.view(num_tokens, top_k, hidden) * weights.to(dtype).unsqueeze(-1)
    return weighted.sum(dim=1).to(x.dtype)


def _check_shapes(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    lora: ExpertLoRA | None,
) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
    if ids.dim() != 2 or ids.shape[0] != x.shape[0]:
        raise ValueError(f"ids must be [T, k] with T={x.shape[0]}, got shape {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
    if tuple(weights.shape) != tuple(ids.shape):
        raise ValueError(f"weights must have the shape of ids {tuple(ids.shape)}, got {tuple(weights.shape)}")
    if gate_up.dim() != 3 or gate_up.shape[1] % 2 or gate_up.shape[2] != x.shape[1]:
        raise ValueError(f"gate_up must be [E, 2I, H] with H={x.shape[1]}, got shape {tuple(gate_up.shape)}")
    num_experts, two_i, hidden = gate_up.shape
    if tuple(down.shape) != (num_experts, hidden, two_i // 2):
        raise ValueError(
            f"down must be [E, H, I]={(num_experts, hidden, two_i // 2)}, got {tuple(down.shape)}"
        )
    if lora is None:
        return
    expected = {
        "a_gu": (num_experts, None, hidden),
        "b_gu": (num_experts, two_i, None),
        "a_d": (num_experts, None, two_i // 2),
        "b_d": (num_experts, hidden, None),
    }
    for name, shape in expected.items():
        tensor = getattr(lora, name)
        if tensor is None:
            continue
        if tensor.dim() != 3 or any(
            want is not None and got != want for got, want in zip(tensor.shape, shape, strict=True)
        ):
            raise ValueError(f"lora.{name} must be {_shape_text(shape)}, got {tuple(tensor.shape)}")
    for first, second in (("a_gu", "b_gu"), ("a_d", "b_d")):
        a, b = getattr(lora, first), getattr(lora, second)
        if (a is None) != (b is None):
            raise ValueError(f"lora.{first} and lora.{second} must both be given or both be None")
        if a is not None and b is not None and a.shape[1] != b.shape[2]:
            raise ValueError(f"lora.{first} rank {a.shape[1]} differs from lora.{second} rank {b.shape[2]}")


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("r" if dim is None else str(dim) for dim in shape) + "]"


# -- the reference layer: same interface as the kernel layer ----------------------------------------------


@dataclass
class ExpertGrads:
    """Gradients written by a layer's backward (LoRA grads None where the forward had no LoRA)."""

    grad_x: torch.Tensor
    grad_weights: torch.Tensor
    lora: tuple[torch.Tensor | None, ...]


class ReferenceHandle:
    """What a saving forward keeps for its backward: here, the autograd graph of the forward."""

    def __init__(
        self, layer: ReferenceLayer, output: torch.Tensor, inputs: list[torch.Tensor | None]
    ) -> None:
        self.layer: ReferenceLayer | None = layer
        self.output: torch.Tensor | None = output
        self.inputs = inputs

    @property
    def consumed(self) -> bool:
        return self.output is None


class ReferenceLayer:
    """Routed experts in plain PyTorch with the kernel layer's interface (CPU tensors in, CPU tensors out)."""

    backend = "reference"

    def __init__(self, num_experts: int, top_k: int, hidden: int, intermediate: int) -> None:
        self.num_experts = num_experts
        self.top_k = top_k
        self.hidden = hidden
        self.intermediate = intermediate
        self.gate_up: torch.Tensor | None = None
        self.down: torch.Tensor | None = None

    def host_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """Dtype in which activations of `dtype` are handed to this layer."""
        return dtype

    def load_weights(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        # Our own copy, so the caller may free or reuse its tensors.
        self.gate_up = gate_up.detach().to("cpu", copy=True).contiguous()
        self.down = down.detach().to("cpu", copy=True).contiguous()

    def forward(
        self,
        x: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
        lora: ExpertLoRA | None,
        save: bool,
    ) -> tuple[torch.Tensor, ReferenceHandle | None]:
        gate_up, down = self._weights()
        if not save:
            with torch.no_grad():
                return moe_forward(x, ids, weights, gate_up, down, lora), None
        lora = lora or ExpertLoRA()
        leaves = [_leaf(t) for t in (x, weights, *lora.tensors())]
        # The graph is this layer's private activation cache: keep outer saved-tensor hooks (checkpointing,
        # offloading) away from it, as they cannot see inside the kernels either.
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            output = moe_forward(
                leaves[0], ids, leaves[1], gate_up, down, lora.replace_tensors(tuple(leaves[2:]))
            )
        # A separate tensor for the caller, so nothing it does to the output reaches the kept graph.
        return output.detach().clone(), ReferenceHandle(self, output, leaves)

    def backward(self, handle: ReferenceHandle, grad_out: torch.Tensor) -> ExpertGrads:
        if not isinstance(handle, ReferenceHandle):
            raise TypeError(
                f"handle must come from ReferenceLayer.forward(save=True), got {type(handle).__name__}"
            )
        if handle.output is None:
            raise RuntimeError("handle was already consumed by a backward")
        if handle.layer is not self:
            raise ValueError("handle belongs to another layer")
        output, inputs = handle.output, handle.inputs
        handle.output, handle.layer, handle.inputs = None, None, []
        present = [t for t in inputs if t is not None]
        grads = iter(torch.autograd.grad(output, present, grad_out, allow_unused=True))
        written = []
        for tensor in inputs:
            if tensor is None:
                written.append(None)
                continue
            grad = next(grads)
            written.append(torch.zeros_like(tensor) if grad is None else grad)
        return ExpertGrads(grad_x=written[0], grad_weights=written[1], lora=tuple(written[2:]))

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.gate_up is None or self.down is None:
            raise RuntimeError("expert weights are not loaded (call load_weights first)")
        return self.gate_up, self.down


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _leaf(tensor: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is None:
        return None
    return tensor.detach().requires_grad_(tensor.dtype.is_floating_point)
