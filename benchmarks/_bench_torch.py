"""PyTorch CPU baselines (bf16 unless named fp32): forward with autograd (its graph is the saved state),
then backward.

- `TorchLoop`: what a naive user writes. Per expert: pick its tokens with index_select, F.linear for the
  base, PEFT's LoRA (lora_B(lora_A(x)) * scaling) with per-expert LoRA parameters that require grad,
  frozen base weights, index_add_ into the output, out.backward(grad_out).
- `TorchSorted`: batched formulation. Sort the (token, slot) pairs by expert once, gather x once, run
  per-expert matmuls on contiguous row ranges, scatter once.
- `TorchGroupedMM`: the same sorted layout through torch._grouped_mm (one call per projection, stacked
  LoRA parameters).
- `TorchSortedFP32`: `TorchSorted` in float32 (reported apart: not a bf16 baseline).
All of them compute DESIGN.md §2 exactly (fused gate_up with one A shared by gate and up).
"""

from __future__ import annotations

import _bench_inputs as inputs
import numpy as np
import torch
import torch.nn.functional as F
from _bench_inputs import Problem


def _bf16(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(bits).view(torch.bfloat16)


def _grad_to_np(t: torch.Tensor | None, like: torch.Tensor) -> np.ndarray:
    """A gradient as float32; a parameter that got no gradient (no tokens) counts as zero."""
    if t is None:
        return np.zeros(tuple(like.shape), dtype=np.float32)
    return t.detach().float().numpy()


class _TorchBase:
    name = "torch"
    stacked_lora = False
    dtype = torch.bfloat16

    def __init__(self, p: Problem, threads: int) -> None:
        torch.set_num_threads(threads)
        self.p = p
        sh = p.shape
        gate_up, down = inputs.fused_weights(p)
        self.w_gu = _bf16(gate_up).to(self.dtype)  # frozen: plain tensors, no grad
        self.w_d = _bf16(down).to(self.dtype)
        del gate_up, down
        lora = inputs.lora_weights(p)
        stacked = [_bf16(a).to(self.dtype) for a in (lora.a_gu, lora.b_gu, lora.a_d, lora.b_d)]
        if self.stacked_lora:
            self.lora_params = [torch.nn.Parameter(t.clone()) for t in stacked]
        else:  # one parameter per expert and matrix, as PEFT's per-module LoRA layers hold them
            self.lora_params = [
                [torch.nn.Parameter(t[e].clone()) for e in range(sh.num_experts)] for t in stacked
            ]
        self.x_base = _bf16(inputs.hidden_states(p)).to(self.dtype)
        self.grad_out = _bf16(inputs.grad_output(p)).to(self.dtype)
        ids, weights = inputs.routing(p)
        self.ids = torch.from_numpy(ids)
        self.weights_base = torch.from_numpy(weights).to(self.dtype)  # exact: the values are bf16
        self.x: torch.Tensor | None = None
        self.w: torch.Tensor | None = None
        self.out: torch.Tensor | None = None

    def setup_costs(self) -> dict[str, float]:
        return {}

    def prepare_step(self) -> None:
        """zero_grad(set_to_none=True), and fresh leaves for x and the routing weights."""
        for group in self.lora_params:
            for param in group if isinstance(group, list) else [group]:
                param.grad = None
        self.x = self.x_base.detach().requires_grad_(True)
        self.w = self.weights_base.detach().requires_grad_(True)

    def _leaf_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.x is not None and self.w is not None
        return self.x, self.w

    def forward(self) -> None:
        raise NotImplementedError

    def between(self) -> None:
        """Nothing runs between forward and backward here."""

    def backward(self) -> None:
        assert self.out is not None
        self.out.backward(self.grad_out)

    def checked(self, tokens: np.ndarray, experts: np.ndarray) -> dict[str, np.ndarray]:
        assert self.out is not None and self.x is not None and self.w is not None
        result = {
            "out": self.out.detach()[tokens].float().numpy(),
            "dx": _grad_to_np(self.x.grad, self.x)[tokens],
            "grad_w": _grad_to_np(self.w.grad, self.w)[tokens],
        }
        for key, group in zip(("da_gu", "db_gu", "da_d", "db_d"), self.lora_params, strict=True):
            if isinstance(group, list):
                result[key] = np.stack([_grad_to_np(group[e].grad, group[e]) for e in experts.tolist()])
            else:
                result[key] = _grad_to_np(group.grad, group)[experts]
        return result


class TorchLoop(_TorchBase):
    name = "torch-loop"

    def forward(self) -> None:
        x, w = self._leaf_inputs()
        s, i = self.p.scale, self.p.shape.intermediate
        a_gu, b_gu, a_d, b_d = self.lora_params
        out = torch.zeros_like(self.x_base)
        for e in torch.unique(self.ids).tolist():
            token, slot = torch.nonzero(self.ids == e, as_tuple=True)
            xe = x.index_select(0, token)
            gu = F.linear(xe, self.w_gu[e]) + F.linear(F.linear(xe, a_gu[e]), b_gu[e]) * s
            h = F.silu(gu[:, :i]) * gu[:, i:]
            y = F.linear(h, self.w_d[e]) + F.linear(F.linear(h, a_d[e]), b_d[e]) * s
            out.index_add_(0, token, y * w[token, slot].unsqueeze(1))
        self.out = out


class _SortedBase(_TorchBase):
    def _sorted_pairs(self) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        flat = self.ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.p.shape.num_experts)
        return order // self.p.shape.top_k, order, counts.tolist()


class TorchSorted(_SortedBase):
    name = "torch-sorted"

    def forward(self) -> None:
        x, w = self._leaf_inputs()
        s, i = self.p.scale, self.p.shape.intermediate
        a_gu, b_gu, a_d, b_d = self.lora_params
        token, order, counts = self._sorted_pairs()
        xs = x.index_select(0, token)
        ys = []
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            xe = xs[start : start + n]
            start += n
            gu = xe @ self.w_gu[e].T + ((xe @ a_gu[e].T) @ b_gu[e].T) * s
            h = F.silu(gu[:, :i]) * gu[:, i:]
            ys.append(h @ self.w_d[e].T + ((h @ a_d[e].T) @ b_d[e].T) * s)
        y = torch.cat(ys) * w.reshape(-1)[order].unsqueeze(1)
        self.out = torch.zeros_like(self.x_base).index_add(0, token, y)


class TorchGroupedMM(_SortedBase):
    name = "torch-grouped_mm"
    stacked_lora = True

    def forward(self) -> None:
        x, w = self._leaf_inputs()
        s, i = self.p.scale, self.p.shape.intermediate
        a_gu, b_gu, a_d, b_d = self.lora_params
        token, order, counts = self._sorted_pairs()
        offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)

        def gmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch._grouped_mm(a, b.transpose(-2, -1), offs=offs)

        xs = x.index_select(0, token)
        gu = gmm(xs, self.w_gu) + gmm(gmm(xs, a_gu), b_gu) * s
        h = F.silu(gu[:, :i]) * gu[:, i:]
        y = gmm(h, self.w_d) + gmm(gmm(h, a_d), b_d) * s
        y = y * w.reshape(-1)[order].unsqueeze(1)
        self.out = torch.zeros_like(self.x_base).index_add(0, token, y)


class TorchSortedFP32(TorchSorted):
    """The sorted formulation computed in float32 (inputs upcast once, outside the timing): what a user
    does where bf16 matmuls have no native instructions. Same input values; more memory."""

    name = "torch-sorted-fp32"
    dtype = torch.float32


def grouped_mm_available() -> str | None:
    """None when torch._grouped_mm runs forward and backward on CPU here, else the reason."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    try:
        a = torch.ones(4, 32, dtype=torch.bfloat16, requires_grad=True)
        b = torch.ones(2, 32, 32, dtype=torch.bfloat16, requires_grad=True)
        y = torch._grouped_mm(a, b, offs=torch.tensor([2, 4], dtype=torch.int32))
        y.backward(torch.ones_like(y).contiguous())
    except (RuntimeError, NotImplementedError) as error:
        return f"torch._grouped_mm on CPU failed: {error}"
    return None


BACKENDS = {cls.name: cls for cls in (TorchLoop, TorchSorted, TorchGroupedMM, TorchSortedFP32)}
