"""Deterministic random inputs for the MoE benchmark, identical in every process.

Each tensor, and each expert's slice of a per-expert tensor, draws from its own random stream keyed by
(seed, tensor, expert). Any process can therefore build any layout directly (fused gate_up for us and
PyTorch, separate gate/up for kt-kernel, one expert at a time for the float64 reference) and all of them
see bit-identical bf16 values. bf16 arrays are held as uint16 bit patterns; each backend views them in
its own bf16 type.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

BF16_BYTES = 2


@dataclass(frozen=True)
class Shape:
    name: str
    num_experts: int
    hidden: int
    intermediate: int
    top_k: int


SHAPES: dict[str, Shape] = {
    "qwen3-30b": Shape("qwen3-30b", 128, 2048, 768, 8),
    "qwen3-235b": Shape("qwen3-235b", 128, 4096, 1536, 8),
    "deepseek-v3": Shape("deepseek-v3", 256, 7168, 2048, 8),
}


@dataclass(frozen=True)
class Problem:
    """One benchmark case: a layer shape, a token count and the LoRA configuration."""

    shape: Shape
    tokens: int
    rank: int = 16
    alpha: float = 32.0
    seed: int = 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict) -> Problem:
        return Problem(Shape(**data["shape"]), data["tokens"], data["rank"], data["alpha"], data["seed"])

    def expert_weight_bytes(self) -> int:
        """bf16 bytes of one expert's base weights (gate, up, down)."""
        return 3 * self.shape.hidden * self.shape.intermediate * BF16_BYTES


# Stream ids: one per tensor, so adding a tensor never changes the others' values.
_X, _GRAD_OUT, _ROUTING = 1, 2, 3
_GATE, _UP, _DOWN = 10, 11, 12
_A_GU, _B_GU, _A_D, _B_D = 20, 21, 22, 23


def _rng(problem: Problem, tensor: int, expert: int = 0) -> np.random.Generator:
    return np.random.default_rng([problem.seed, tensor, expert])


def f32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 to bf16 (nearest even), returned as uint16 bit patterns. Inputs are finite."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return ((bits + rounding) >> np.uint32(16)).astype(np.uint16)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _uniform_bf16(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    """Uniform values with the given standard deviation, rounded to bf16 bits."""
    values = rng.random(shape, dtype=np.float32)
    values *= np.float32(2.0 * math.sqrt(3.0) * std)
    values -= np.float32(math.sqrt(3.0) * std)
    return f32_to_bf16_bits(values)


# Scales: W x and s·B·(A x) both have unit entries, so a dropped or mis-scaled LoRA cannot hide.
def _gate_up_std(p: Problem) -> float:
    return 1.0 / math.sqrt(p.shape.hidden)


def _down_std(p: Problem) -> float:
    return 1.0 / math.sqrt(p.shape.intermediate)


def _lora_b_std(p: Problem) -> float:
    return 1.0 / (p.scale * math.sqrt(p.rank))


def gate(p: Problem, expert: int) -> np.ndarray:
    return _uniform_bf16(_rng(p, _GATE, expert), (p.shape.intermediate, p.shape.hidden), _gate_up_std(p))


def up(p: Problem, expert: int) -> np.ndarray:
    return _uniform_bf16(_rng(p, _UP, expert), (p.shape.intermediate, p.shape.hidden), _gate_up_std(p))


def down(p: Problem, expert: int) -> np.ndarray:
    return _uniform_bf16(_rng(p, _DOWN, expert), (p.shape.hidden, p.shape.intermediate), _down_std(p))


def lora_a_gu(p: Problem, expert: int) -> np.ndarray:
    return _uniform_bf16(_rng(p, _A_GU, expert), (p.rank, p.shape.hidden), _gate_up_std(p))


def lora_b_gu(p: Problem, expert: int) -> np.ndarray:
    """[2I, r]: rows 0..I-1 belong to gate, I..2I-1 to up."""
    return _uniform_bf16(_rng(p, _B_GU, expert), (2 * p.shape.intermediate, p.rank), _lora_b_std(p))


def lora_a_d(p: Problem, expert: int) -> np.ndarray:
    return _uniform_bf16(_rng(p, _A_D, expert), (p.rank, p.shape.intermediate), _down_std(p))


def lora_b_d(p: Problem, expert: int) -> np.ndarray:
    return _uniform_bf16(_rng(p, _B_D, expert), (p.shape.hidden, p.rank), _lora_b_std(p))


def _fill_per_expert(num_experts: int, fill_one: Callable[[int], None], threads: int | None = None) -> None:
    """Run fill_one(e) for every expert on a thread pool (NumPy releases the GIL while filling)."""
    workers = threads or len(os.sched_getaffinity(0))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(fill_one, range(num_experts)))


def fused_weights(p: Problem) -> tuple[np.ndarray, np.ndarray]:
    """gate_up [E, 2I, H] (rows 0..I-1 gate) and down [E, H, I], bf16 bits."""
    e, h, i = p.shape.num_experts, p.shape.hidden, p.shape.intermediate
    gate_up = np.empty((e, 2 * i, h), dtype=np.uint16)
    down_all = np.empty((e, h, i), dtype=np.uint16)

    def fill(expert: int) -> None:
        gate_up[expert, :i] = gate(p, expert)
        gate_up[expert, i:] = up(p, expert)
        down_all[expert] = down(p, expert)

    _fill_per_expert(e, fill)
    return gate_up, down_all


def separate_weights(p: Problem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """gate [E, I, H], up [E, I, H], down [E, H, I], bf16 bits (kt-kernel's layout)."""
    e, h, i = p.shape.num_experts, p.shape.hidden, p.shape.intermediate
    gate_all = np.empty((e, i, h), dtype=np.uint16)
    up_all = np.empty((e, i, h), dtype=np.uint16)
    down_all = np.empty((e, h, i), dtype=np.uint16)

    def fill(expert: int) -> None:
        gate_all[expert] = gate(p, expert)
        up_all[expert] = up(p, expert)
        down_all[expert] = down(p, expert)

    _fill_per_expert(e, fill)
    return gate_all, up_all, down_all


@dataclass
class LoRAWeights:
    """PEFT's fused form (one A shared by gate and up), bf16 bits."""

    a_gu: np.ndarray  # [E, r, H]
    b_gu: np.ndarray  # [E, 2I, r]
    a_d: np.ndarray  # [E, r, I]
    b_d: np.ndarray  # [E, H, r]


def lora_weights(p: Problem) -> LoRAWeights:
    e, h, i, r = p.shape.num_experts, p.shape.hidden, p.shape.intermediate, p.rank
    lora = LoRAWeights(
        a_gu=np.empty((e, r, h), np.uint16),
        b_gu=np.empty((e, 2 * i, r), np.uint16),
        a_d=np.empty((e, r, i), np.uint16),
        b_d=np.empty((e, h, r), np.uint16),
    )

    def fill(expert: int) -> None:
        lora.a_gu[expert] = lora_a_gu(p, expert)
        lora.b_gu[expert] = lora_b_gu(p, expert)
        lora.a_d[expert] = lora_a_d(p, expert)
        lora.b_d[expert] = lora_b_d(p, expert)

    _fill_per_expert(e, fill)
    return lora


def hidden_states(p: Problem) -> np.ndarray:
    """x [T, H], bf16 bits."""
    return _uniform_bf16(_rng(p, _X), (p.tokens, p.shape.hidden), 1.0)


def grad_output(p: Problem) -> np.ndarray:
    """dL/dout [T, H], bf16 bits."""
    return _uniform_bf16(_rng(p, _GRAD_OUT), (p.tokens, p.shape.hidden), 1.0)


def routing(p: Problem) -> tuple[np.ndarray, np.ndarray]:
    """Uniform random top-k: ids [T, k] int64 (k distinct experts per token) and weights [T, k] float32.

    Weights are positive, sum to ~1 per token, and are exactly representable in bf16 so a backend that
    takes bf16 routing weights sees the same values.
    """
    rng = _rng(p, _ROUTING)
    t, e, k = p.tokens, p.shape.num_experts, p.shape.top_k
    ids = np.argsort(rng.random((t, e), dtype=np.float32), axis=1)[:, :k].astype(np.int64)
    raw = rng.random((t, k), dtype=np.float32) + np.float32(0.25)
    weights = bf16_bits_to_f32(f32_to_bf16_bits(raw / raw.sum(axis=1, keepdims=True)))
    return np.ascontiguousarray(ids), np.ascontiguousarray(weights)


def check_tokens(p: Problem, count: int) -> np.ndarray:
    """Token rows whose output, dx and routing-weight gradient are checked (evenly spread)."""
    if count >= p.tokens:
        return np.arange(p.tokens)
    return np.unique(np.linspace(0, p.tokens - 1, count).round().astype(np.int64))


def check_experts(p: Problem, ids: np.ndarray, count: int) -> np.ndarray:
    """Experts whose LoRA gradients are checked: evenly spread over those that received tokens."""
    used = np.unique(ids[(ids >= 0) & (ids < p.shape.num_experts)])
    if count >= len(used):
        return used
    return used[np.unique(np.linspace(0, len(used) - 1, count).round().astype(np.int64))]


def active_experts(p: Problem, ids: np.ndarray) -> int:
    return len(np.unique(ids[(ids >= 0) & (ids < p.shape.num_experts)]))
