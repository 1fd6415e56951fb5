"""Issue 16 item 8a with torch tensors: a kk.LoRA and a ForwardHandle follow a tensor whose storage was
re-allocated after it was handed over (resize_, set_), and reject one whose shape changed. (The kernel
wheel's own tests do the same with NumPy: packages/kt-sft-kernels/tests/test_memory_safety.py.)"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

kk = pytest.importorskip("kt_sft_kernels")
from kt_sft_kernels import testing as kt  # noqa: E402

E, K, H, INTER, R, T = 4, 2, 64, 64, 4, 19


def setup() -> tuple[kk.MoELayer, dict[str, torch.Tensor]]:
    case = kt.make_case(
        tokens=T, num_experts=E, top_k=K, hidden=H, intermediate=INTER, rank_gu=R, rank_d=R, seed=4
    )
    layer = kt.build_layer(case)
    assert case.lora is not None
    tensors = {
        "x": torch.from_numpy(case.x.astype(np.float32)).to(torch.bfloat16),
        "ids": torch.from_numpy(case.ids.astype(np.int64)).clone(),
        "weights": torch.from_numpy(case.weights.astype(np.float32)).clone(),
        "grad_out": torch.from_numpy(case.grad_out.astype(np.float32)).to(torch.bfloat16),
        **{n: torch.from_numpy(getattr(case.lora, n)).clone() for n in ("a_gu", "b_gu", "a_d", "b_d")},
    }
    return layer, tensors


def forward_backward(
    layer: kk.MoELayer, t: dict[str, torch.Tensor], *, between: Callable[[], None], before: Callable[[], None]
) -> dict[str, torch.Tensor]:
    lora = kk.LoRA(t["a_gu"], t["b_gu"], t["a_d"], t["b_d"], 0.75, 0.5)
    before()
    out = torch.full((T, H), float("nan"), dtype=torch.bfloat16)
    handle = layer.forward(t["x"], t["ids"], t["weights"], out, lora=lora, save=True)
    between()
    res = {"out": out, "grad_x": torch.empty_like(t["x"]), "grad_w": torch.empty_like(t["weights"])}
    grads = {f"d{n}": torch.full_like(t[n], float("nan")) for n in ("a_gu", "b_gu", "a_d", "b_d")}
    layer.backward(handle, t["grad_out"], res["grad_x"], res["grad_w"], lora_grads=kk.LoRAGrads(**grads))
    return {**res, **grads}


def moved_by_resize(t: torch.Tensor) -> None:
    shape, values, before = t.shape, t.clone(), t.data_ptr()
    t.resize_(t.numel() * 64)  # grows the storage: re-allocated, the old buffer freed
    t.resize_(shape)
    t.copy_(values)
    assert t.data_ptr() != before


def moved_by_set(t: torch.Tensor) -> None:
    fresh = t.clone()
    before = t.data_ptr()
    t.set_(fresh)  # t now lives in fresh's storage; its old storage is freed
    assert t.data_ptr() != before


@pytest.mark.parametrize("move", [moved_by_resize, moved_by_set], ids=["resize_", "set_"])
@pytest.mark.parametrize("name", ["a_gu", "b_gu", "a_d", "b_d", "x"])
@pytest.mark.parametrize("when", ["before_forward", "between"])
def test_moved_torch_storage_is_followed(move: Callable[[torch.Tensor], None], name: str, when: str) -> None:
    if name == "x" and when == "before_forward":
        pytest.skip("x is taken at forward, not before")
    results = []
    for do_move in (False, True):
        layer, t = setup()
        new = torch.randn(t[name].shape, generator=torch.Generator().manual_seed(9)).to(t[name].dtype) * 0.1

        def change(tensor: torch.Tensor = t[name], new: torch.Tensor = new, do_move: bool = do_move) -> None:
            if do_move:
                move(tensor)
            tensor.copy_(new)

        hooks = {"before": lambda: None, "between": lambda: None}
        hooks["before" if when == "before_forward" else "between"] = change
        results.append(forward_backward(layer, t, **hooks))
    for key, value in results[0].items():
        assert torch.isfinite(value.float()).all(), key
        assert torch.equal(value, results[1][key]), key


def test_changed_torch_shape_is_rejected() -> None:
    layer, t = setup()
    lora = kk.LoRA(t["a_gu"], t["b_gu"], t["a_d"], t["b_d"], 0.75, 0.5)
    t["b_gu"].resize_(E, 2 * INTER, R - 1)
    out = torch.empty((T, H), dtype=torch.bfloat16)
    with pytest.raises(
        ValueError, match=r"^b_gu: changed after the LoRA was built: it was \(4, 128, 4\) float32"
    ):
        layer.forward(t["x"], t["ids"], t["weights"], out, lora=lora)


def test_param_data_replaced_keeps_the_old_tensor_alive() -> None:
    """`param.data = new` gives the Parameter a new tensor; the LoRA holds the tensor it was given (from
    `.detach()`), which keeps the old storage alive: no freed memory is read, the old values are used.
    To use the new values, build a new kk.LoRA (or update the tensors in place, as optimizers do)."""
    layer, t = setup()
    param = torch.nn.Parameter(t["a_gu"].clone())
    lora = kk.LoRA(param.detach(), t["b_gu"], t["a_d"], t["b_d"], 0.75, 0.5)
    expected = torch.empty((T, H), dtype=torch.bfloat16)
    layer.forward(t["x"], t["ids"], t["weights"], expected, lora=lora)
    param.data = torch.randn_like(param)
    torch.randn(1 << 20)  # churn the allocator
    out = torch.empty((T, H), dtype=torch.bfloat16)
    layer.forward(t["x"], t["ids"], t["weights"], out, lora=lora)
    assert torch.equal(out, expected)
