"""End-to-end LoRA training of the Qwen3-30B-A3B architecture: kt-sft vs plain HF + PEFT, side by side.

Random-init weights from a hand-written config matching Qwen/Qwen3-30B-A3B (hidden 2048, 128 experts of
intermediate 768, top-8, 32 query / 4 KV heads of 128, vocab 151936), the first --layers decoder layers
(default 8 of 48). Nothing is downloaded. LoRA r=16 (alpha 32) on q/k/v/o and on the routed experts'
gate_up_proj / down_proj, AdamW (fused), one sequence of --seq-len tokens (default 2048) per step.

Variants (each runs in its own process, so peak memory is its own):
  kt_sft          experts in kt-sft's CPU kernels (AMX where the CPU has it), everything else on the GPU;
                  each step's batch split into --overlap micro-batches (default 2, one row or more each)
                  run on threads of their own (kt_sft_train.overlap): one micro-batch's CPU experts run
                  while the GPU computes the other's dense part, in the forward and in the backward
  kt_sft_no_overlap  the same without micro-batches (the whole batch in one forward and backward)
  hf_experts_cpu  plain transformers + PEFT with the experts left on the CPU in PyTorch (bf16); the rest
                  on the GPU. Hooks move the experts' inputs to the CPU and their output back: what a user
                  without kt-sft does when the experts do not fit the GPU
  hf_all_gpu      plain transformers + PEFT entirely on the GPU, at the deepest of --layers, --layers/2,
                  ... that fits (the upper bound)
  kt_kernel       the reference system, kt-kernel 0.7.2's own SFT wrapper (opt-in: --variants ...,kt_kernel);
                  see "kt-kernel" below

kt-kernel (variant kt_kernel). Its unpacked wheel is put on sys.path from --kt-kernel-path (default
<repo>/.kt_kernel/py3XX, as benchmarks/_bench_kt.py finds it), together with every *.whl file in that
folder: kt_kernel imports `gguf` at the top of kt_kernel/utils/loader.py, so a pure-Python gguf wheel
(`pip download --no-deps gguf -d <that folder>`) must be there where gguf is not installed. Only entry
points that need no forked library are used (its load_kt_model needs `transformers.integrations.kt` and
accelerate's KTransformersPlugin, which stock libraries lack):
  1. the same random model as the HF variants, experts materialized on the CPU, the rest on the GPU;
  2. kt_kernel.sft.KTConfig(kt_backend="AMXBF16", kt_lora_rank=16, kt_lora_alpha=32, kt_num_threads=
     --kt-threads, kt_model_max_length=batch*seq, activation policy cpu=retain,gpu=retain; with
     --gradient-checkpointing cpu=retain,gpu=recompute plus kt's checkpoint context_fn);
  3. kt_kernel.sft.wrap_moe_layers_with_kt_wrapper(model, config): every Qwen3MoeSparseMoeBlock becomes
     its KTMoELayerWrapper (router on the GPU, experts in AMXBF16_SFT_MOE via AMXSFTMoEWrapper);
  4. peft.get_peft_model with plain LoRA r=16, alpha 32 on q/k/v/o only: transformers 5's experts are
     fused 3-D parameters, which kt-kernel keeps out of PEFT;
  5. kt_kernel.sft.kt_adapt_peft_lora(model): since the experts are fused it takes its "fused expert LoRA"
     path (_use_fused_expert_lora; kt_force_fused_expert_lora is not needed) and creates its own bf16
     CPU LoRA tensors per layer, registered with the kernel; get_kt_trainable_params returns them and
     they join PEFT's parameters in the same AdamW;
  6. the same step loop, plus kt_kernel.sft.update_kt_lora_pointers(model) after every optimizer step,
     as its trainer integration does (marks the kernel's LoRA views for refresh before the next forward).

Expert LoRA, kt-kernel vs ours (rank 16, alpha 32, so scale 2 in both; the same projections):
  ours       gate_up_proj: one A [16, H] shared by gate and up, B [2I, 16]; down_proj: A [16, I], B [H, 16]
             (per expert; PEFT target_parameters layout); fp32 LoRA weights
  kt-kernel  gate: A [16, H], B [I, 16]; up: A [16, H], B [I, 16]; down: A [16, I], B [H, 16] (per expert)
             bf16 LoRA weights
kt-kernel has a separate A for gate and up: 16*H more trainable values per expert (Qwen3-30B-A3B:
8,448 vs 6,400 x 16 per expert, +32%), and a little more LoRA arithmetic. Its B starts at zero as ours
does, so the first step's loss equals the other variants' (same random weights). Its LoRA weights are
bf16 because its AMXBF16 kernel takes no other dtype (AMXSFTMoEWrapper.init_lora_weights rejects them).
Host memory: wrap_moe_layers_with_kt_wrapper reads every layer's experts from the model, so all of them
are materialized (bf16, CPU) before it starts; it packs them layer by layer and replaces each layer's
tensors by empty placeholders, so the peak should stay near one copy of the experts plus one layer's
temporaries (8 layers: ~10 GB of experts); the peak host RSS column shows what it really was.

Measured per variant: tokens/s over --steps timed steps (after --warmup), peak GPU memory, peak host RSS,
and for kt_sft the step-time split over --split-steps more steps (GPU / CPU experts / transfers; the
split's timer synchronizes around each copy, so it is measured apart from the throughput). kt_kernel has
no split: our StepTimer instruments kt-sft's own experts module, and kt-kernel's layer offers no hook
between its CPU kernel, its copies and the GPU work. A kt_kernel run that fails inside kt-kernel (import,
wrapping, adaptation, a step) is recorded as "could not run: <exception> raised in <kt-kernel frame>
(called as <kt-kernel entry point>)" instead of a number.

    python benchmarks/e2e_train.py --out bench-e2e                 # GPU + AMX machine
    python benchmarks/e2e_train.py --out bench-e2e --layers 48     # all layers (host RAM: ~70 GB)
    python benchmarks/e2e_train.py --tiny --out /tmp/e2e           # a tiny model on any machine (CI)
    python benchmarks/e2e_train.py --variants kt_kernel --out bench-e2e-kt   # kt-kernel's own wrapper
    python benchmarks/e2e_train.py --variants kt_sft --batch 2 --layers 48 --trace step.json --out o
    python benchmarks/e2e_train.py --shape dsv3-width --layers 3 --grad-ckpt --batch 2 --out o-dsv3

Every kt-sft variant also runs one traced step (kt_sft_train.trace.StepTrace: kernel profiler stages,
experts calls per thread, micro-batch phases and, with CUDA, torch.profiler's GPU kernels in one Chrome
trace; --trace writes it): the report gives CPU-busy, GPU-busy and both-at-once fractions of that step
and the host bytes the CPU experts retain for the backward (peak, and per layer per token).

Time: each variant builds its model (random weights drawn in parallel on the CPU) and runs warmup +
steps + split steps; at 8 layers a variant takes about a minute or two. With a per-command time limit,
run the variants separately (--variants kt_sft, then hf_experts_cpu, ...) into one --out each.

Writes results.json, results.md and results.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import _bench_kt

DEFAULT_VARIANTS = ("kt_sft", "kt_sft_no_overlap", "hf_experts_cpu", "hf_all_gpu")
VARIANTS = (*DEFAULT_VARIANTS, "kt_kernel")
KT_SFT_VARIANTS = ("kt_sft", "kt_sft_no_overlap")
LABELS = {
    "kt_sft": "kt-sft (experts on CPU kernels, micro-batch overlap)",
    "kt_sft_no_overlap": "kt-sft (experts on CPU kernels, no overlap)",
    "hf_experts_cpu": "HF + PEFT, experts on CPU (PyTorch)",
    "hf_all_gpu": "HF + PEFT, all on GPU",
    "kt_kernel": "kt-kernel 0.7.2 SFT wrapper (experts on CPU)",
}
GIB = 1024**3
OOM_EXIT = 3
UNAVAILABLE_EXIT = 4
REPO_ROOT = Path(__file__).resolve().parent.parent


# -- the model --------------------------------------------------------------------------------------------


SHAPES = ("qwen3-30b-a3b", "dsv3-width")


def model_config(tiny: bool, layers: int, shape_name: str = "qwen3-30b-a3b") -> Any:
    from transformers import Qwen3MoeConfig

    if tiny:
        shape = dict(
            vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        )  # fmt: skip
    elif shape_name == "dsv3-width":
        # DeepSeek-V3's MoE widths (E256 H7168 I2048 top-8, vocab 129280) on the Qwen3-MoE architecture:
        # the routed experts are what the CPU runs; attention is GQA (56 x 128 heads, 8 KV) instead of
        # DeepSeek's MLA, and there is no shared expert and no dense first layers.
        shape = dict(
            vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
            num_attention_heads=56, num_key_value_heads=8, head_dim=128, num_experts=256,
            num_experts_per_tok=8, max_position_embeddings=163840, rope_theta=10_000.0, rms_norm_eps=1e-6,
        )  # fmt: skip
    else:  # Qwen/Qwen3-30B-A3B config.json
        shape = dict(
            vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
            num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
            num_experts_per_tok=8, max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        )  # fmt: skip
    return Qwen3MoeConfig(
        **shape,
        architectures=["Qwen3MoeForCausalLM"],  # as in config.json; kt-kernel detects the family by it
        num_hidden_layers=layers,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        tie_word_embeddings=False,
        use_cache=False,
    )


def meta_model(config: Any, dtype: Any) -> Any:
    import torch
    from transformers import Qwen3MoeForCausalLM

    with torch.device("meta"):
        return Qwen3MoeForCausalLM._from_config(config, dtype=dtype)


RANDOM_CHUNK = 1 << 24  # elements drawn by one generator; chunks are drawn in parallel


def random_weight(name: str, shape: tuple[int, ...], dtype: Any) -> Any:
    """The benchmark's value of parameter `name`: random at initializer scale (uniform, std 0.02), norm
    weights 1. Seeded by the name (and chunk) and drawn on the CPU, so every variant trains the very same
    model whatever the thread count (values do not affect speed, except through routing, which random
    routers keep roughly balanced)."""
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    bound = 0.02 * 3**0.5
    out = torch.empty(shape, dtype=dtype)
    seed = zlib.crc32(name.encode())

    def fill(index_and_chunk: tuple[int, Any]) -> None:
        index, chunk = index_and_chunk
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        chunk.uniform_(-bound, bound, generator=generator)

    chunks = list(enumerate(out.view(-1).split(RANDOM_CHUNK)))
    if len(chunks) == 1:
        fill(chunks[0])
    else:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(fill, chunks))
    return out


def materialize(model: Any, device_of: Callable[[str], Any]) -> None:
    """Give every meta parameter its random_weight on device_of(its name); rebuild rotary buffers."""
    import torch

    for module_name, module in model.named_modules():
        for param_name, param in list(module.named_parameters(recurse=False)):
            if param.device.type != "meta":
                continue
            full = f"{module_name}.{param_name}" if module_name else param_name
            data = random_weight(full, tuple(param.shape), param.dtype).to(device_of(full))
            setattr(module, param_name, torch.nn.Parameter(data, requires_grad=param.requires_grad))
    device = device_of("model.rotary_emb")
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            parent, _, child = name.rpartition(".")
            with torch.device(device):
                setattr(model.get_submodule(parent), child, type(module)(config=model.config))
    leftovers = [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if leftovers:
        raise RuntimeError(f"buffers left on the meta device: {leftovers[:5]}")


ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora_config() -> Any:
    """The plain PEFT config of the HF variants (kt-sft's helper builds the same one for its model)."""
    from peft import LoraConfig

    return LoraConfig(
        r=16,
        lora_alpha=32,
        target_modules=ATTENTION,
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )


def build_kt_sft(
    config: Any, device: Any, dtype: Any, threads: int | None, weight_dtype: str = "bf16"
) -> Any:
    from kt_sft_train import KTConfig, get_moe_arch_config, kt_lora_config
    from kt_sft_train.experts import KTExperts, attach_kt, replace_module
    from peft import get_peft_model

    model = meta_model(config, dtype)
    arch = get_moe_arch_config(model)
    kt = KTConfig(threads=threads, weight_dtype=weight_dtype)
    wrapped = []
    e, h, i = arch.num_experts, arch.hidden_size, arch.intermediate_size
    for path in arch.experts_paths:
        experts = KTExperts.from_arch(arch, kt, dtype=dtype, name=path)
        # One layer at a time, the same values as the HF variants' parameters: the kernels pack a copy.
        gate_up = random_weight(f"{path}.gate_up_proj", (e, 2 * i, h), dtype)
        down = random_weight(f"{path}.down_proj", (e, h, i), dtype)
        experts.load_expert_weights(gate_up, down)
        del gate_up, down
        replace_module(model, path, experts)
        wrapped.append(experts)
    attach_kt(model, wrapped)
    materialize(model, lambda name: device)
    return get_peft_model(model, kt_lora_config(model, r=16, lora_alpha=32, target_modules=ATTENTION))


def build_hf(config: Any, device: Any, dtype: Any, experts_on_cpu: bool) -> Any:
    import torch
    from peft import get_peft_model

    model = meta_model(config, dtype)
    cpu = torch.device("cpu")
    materialize(model, lambda name: cpu if experts_on_cpu and ".mlp.experts." in name else device)
    if experts_on_cpu and device.type != "cpu":
        for name, module in model.named_modules():
            if name.endswith("mlp.experts"):
                module.register_forward_pre_hook(_inputs_to(cpu), with_kwargs=True)
                module.register_forward_hook(_output_to(device))
    return get_peft_model(model, lora_config())


def _inputs_to(device: Any) -> Callable[..., Any]:
    def hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return tuple(a.to(device) for a in args), {k: v.to(device) for k, v in kwargs.items()}

    return hook


def _output_to(device: Any) -> Callable[..., Any]:
    def hook(module: Any, args: Any, output: Any) -> Any:
        return output.to(device)

    return hook


# -- kt-kernel's own SFT wrapper (variant kt_kernel) ------------------------------------------------------


class KtKernelUnavailable(Exception):
    """kt-kernel cannot do this job here; the message says exactly why (recorded as "could not run")."""


def kt_frames(error: BaseException) -> list[tuple[Any, int]]:
    """(code, line) of the traceback's frames that run kt-kernel's Python files, outermost first."""
    frames = [(frame.f_code, line) for frame, line in traceback.walk_tb(error.__traceback__)]
    return [(code, line) for code, line in frames if "kt_kernel" in Path(code.co_filename).parts]


def kt_failure(error: BaseException, entry_point: str) -> KtKernelUnavailable:
    """`error` raised while calling kt-kernel's `entry_point`, named with the innermost kt-kernel frame."""
    where = ""
    frames = kt_frames(error)
    if frames:
        code, line = frames[-1]
        parts = Path(code.co_filename).parts
        file = "/".join(parts[parts.index("kt_kernel") :])
        where = f" raised in {file}:{line} ({getattr(code, 'co_qualname', code.co_name)})"
    first_line = (str(error).strip().splitlines() or [""])[0]
    return KtKernelUnavailable(f"{type(error).__name__}: {first_line}{where} (called as {entry_point})")


def kt_call(entry_point: str, function: Callable[..., Any], *args: Any) -> Any:
    """function(*args); an error raised inside kt-kernel's code (not ours, not out of GPU memory) becomes
    KtKernelUnavailable."""
    try:
        return function(*args)
    except Exception as error:
        if type(error).__name__ == "OutOfMemoryError" or not kt_frames(error):
            raise
        raise kt_failure(error, entry_point) from error


def import_kt_kernel_sft(kt_path: Path) -> Any:
    """kt_kernel.sft from an unpacked wheel folder (and the pure-Python wheels placed beside it)."""
    import importlib

    if not (kt_path / "kt_kernel").is_dir():
        raise KtKernelUnavailable(f"kt-kernel not found at {kt_path} (pass --kt-kernel-path)")
    sys.path[:0] = [str(kt_path), *sorted(str(wheel) for wheel in kt_path.glob("*.whl"))]
    try:
        return importlib.import_module("kt_kernel.sft")
    except ImportError as error:
        hint = ""
        if error.name == "gguf":
            hint = f"; put a gguf wheel in {kt_path} (pip download --no-deps gguf -d {kt_path})"
        raise KtKernelUnavailable(f"{kt_failure(error, 'import kt_kernel.sft')}{hint}") from error


def build_kt_kernel(config: Any, device: Any, dtype: Any, args: argparse.Namespace) -> tuple[Any, Any, list]:
    """(PEFT model, kt_kernel.sft, kt-kernel's expert LoRA parameters): the steps in the module docstring."""
    import torch
    from peft import LoraConfig, get_peft_model

    sft = import_kt_kernel_sft(Path(args.kt_kernel_path))
    policy = {"cpu": "retain", "gpu": "recompute" if args.gradient_checkpointing else "retain"}
    kt_config = kt_call(
        "kt_kernel.sft.KTConfig",
        lambda: sft.KTConfig(
            kt_backend="AMXBF16",
            kt_num_threads=args.kt_threads,
            kt_lora_rank=16,
            kt_lora_alpha=32.0,
            kt_lora_dropout=0.0,
            kt_model_max_length=args.batch * args.seq_len,
            kt_activation_policy=policy,
        ),
    )
    if args.torch_threads is not None:  # KTConfig sets torch's threads to the physical cores
        torch.set_num_threads(args.torch_threads)
    model = meta_model(config, dtype)
    cpu = torch.device("cpu")
    materialize(model, lambda name: cpu if ".mlp.experts." in name else device)
    wrappers = kt_call("kt_kernel.sft.wrap_moe_layers_with_kt_wrapper", sft.wrap_moe_layers_with_kt_wrapper,
                       model, kt_config)  # fmt: skip
    model._kt_wrappers = wrappers  # where kt's own load_kt_model keeps them; its helpers look there
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=ATTENTION))
    kt_call("kt_kernel.sft.kt_adapt_peft_lora", sft.kt_adapt_peft_lora, peft_model)
    expert_lora = kt_call("kt_kernel.sft.get_kt_trainable_params", sft.get_kt_trainable_params, peft_model)
    if not expert_lora:
        raise RuntimeError("kt_adapt_peft_lora created no expert LoRA parameters")
    return peft_model, sft, expert_lora


# -- one variant, in its own process ------------------------------------------------------------------------


def host_memory() -> dict[str, float]:
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            values[key] = int(rest.split()[0]) * 1024 / GIB
    # Resident memory backed by transparent huge pages: weight streaming needs 512x fewer TLB entries
    # on them, so a low share at 48 layers (fragmented host memory) is one reason a layer runs slower
    # in a deep model than alone in bench_moe.py.
    rollup = Path("/proc/self/smaps_rollup")
    for line in rollup.read_text().splitlines() if rollup.exists() else []:
        key, _, rest = line.partition(":")
        if key == "AnonHugePages":
            values[key] = int(rest.split()[0]) * 1024 / GIB
    return {
        "host_peak_gib": values.get("VmHWM", float("nan")),
        "host_rss_gib": values.get("VmRSS", float("nan")),
        "host_huge_pages_gib": values.get("AnonHugePages", float("nan")),
    }


def synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(args: argparse.Namespace, variant: str, layers: int) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)  # LoRA init: the same draws in every variant
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.tiny and device.type != "cuda":
        raise SystemExit("the full-width benchmark needs a CUDA GPU; use --tiny on a CPU-only machine")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = model_config(args.tiny, layers, args.shape)

    build_start = time.perf_counter()
    checkpointing: dict[str, Any] = {"use_reentrant": False}
    kt_expert_lora: list = []
    after_optimizer_step: Callable[[], None] = lambda: None  # noqa: E731
    if variant in KT_SFT_VARIANTS:
        model = build_kt_sft(config, device, dtype, args.threads, args.weight_dtype)
    elif variant == "kt_kernel":
        model, sft, kt_expert_lora = build_kt_kernel(config, device, dtype, args)
        checkpointing["context_fn"] = sft.get_activation_checkpoint_context_fn()
        after_optimizer_step = lambda: sft.update_kt_lora_pointers(model)  # noqa: E731
    else:
        model = build_hf(config, device, dtype, experts_on_cpu=variant == "hf_experts_cpu")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    model.train()
    build_s = time.perf_counter() - build_start
    # kt-kernel's expert LoRA lives outside the module tree (kt_adapt_peft_lora's own tensors).
    trainable = [p for p in model.parameters() if p.requires_grad] + kt_expert_lora
    expert_lora_params = sum(p.numel() for p in kt_expert_lora) + sum(
        p.numel() for name, p in model.named_parameters() if p.requires_grad and ".experts." in name
    )
    # fused: one pass per tensor. torch's default for a CPU parameter (the experts' LoRA of kt-sft and
    # kt-kernel) is the per-op loop, ~5x slower there; the same optimizer in every variant.
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=True)
    generator = torch.Generator().manual_seed(7)
    batch = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=generator).to(device)
    if device.type == "cuda":
        gpu_after_build = torch.cuda.memory_allocated(device) / GIB
        torch.cuda.reset_peak_memory_stats(device)

    losses: list[float] = []
    microbatches = overlap_microbatches(args, variant)

    def step() -> None:
        if microbatches > 1:
            from kt_sft_train.overlap import run_microbatches, split_batch

            parts = split_batch({"input_ids": batch, "labels": batch}, microbatches)
            loss = run_microbatches(
                lambda mb: model(**mb, use_cache=False).loss,
                parts,
                parameters=trainable,
                weights=[mb["input_ids"].shape[0] / args.batch for mb in parts],  # equal-length rows
            )
        else:
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            loss.backward()
        optimizer.step()
        after_optimizer_step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))

    def timed_steps() -> float:
        for _ in range(args.warmup):
            step()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        synchronize(device)
        return (time.perf_counter() - start) / args.steps

    if variant == "kt_kernel":
        seconds = kt_call("training steps through kt_kernel.sft.KTMoELayerWrapper", timed_steps)
    else:
        seconds = timed_steps()
    tokens = args.batch * args.seq_len

    label = LABELS[variant]
    if variant == "kt_sft" and microbatches == 1:
        label = "kt-sft (experts on CPU kernels, overlap off: batch of 1 row)"
    if variant in KT_SFT_VARIANTS and args.weight_dtype != "bf16":
        label = label.replace("CPU kernels", f"CPU kernels, {args.weight_dtype} base")
    result: dict[str, Any] = {
        "variant": variant,
        "label": label,
        "layers": layers,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "step_time_s": seconds,
        "tokens_per_s": tokens / seconds,
        "ms_per_layer": seconds * 1e3 / layers,
        "build_time_s": build_s,
        "trainable_params": sum(p.numel() for p in trainable),
        "expert_lora_params": expert_lora_params,
        "losses": losses,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dense_dtype": str(dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "experts_implementation": model.get_base_model().config._experts_implementation,
        "microbatches": microbatches,
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "shape": "tiny" if args.tiny else args.shape,
    }
    if device.type == "cuda":
        result["gpu_after_build_gib"] = gpu_after_build
        result["gpu_peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    if variant == "kt_kernel":
        import kt_kernel

        result["kernel_tier"] = f"kt-kernel {kt_kernel.__cpu_variant__}"
        result["kt_threads"] = args.kt_threads
        result["split_note"] = "not measured: kt-kernel's layer has no hook between its CPU and GPU work"
    if variant in KT_SFT_VARIANTS:
        import kt_sft_kernels
        from kt_sft_train.timing import StepSplit, StepTimer
        from kt_sft_train.trace import StepTrace

        # One traced step: CPU-busy / GPU-busy / overlap and retained host bytes (profilers on: not timed).
        with StepTrace(model) as trace:
            step()
        trace_path = trace_file(args, variant)
        result["trace"] = trace.write(trace_path) if trace_path else trace.summary()
        if trace_path:
            result["trace_path"] = trace_path

        result["kernel_tier"] = kt_sft_kernels.active_isa()
        total = StepSplit(0.0, 0.0, 0.0)
        with StepTimer(model) as timer:
            for _ in range(args.split_steps):
                timer.start_step()
                step()
                total = total + timer.end_step()
        n = max(1, args.split_steps)
        result["split_s"] = {
            "gpu_and_rest": total.dense_s / n,
            "cpu_experts": total.experts_cpu_s / n,
            "transfers": total.transfer_s / n,
            "total": total.total_s / n,
        }
    result.update(host_memory())
    return result


def overlap_microbatches(args: argparse.Namespace, variant: str) -> int:
    """Micro-batches in flight for `variant`: --overlap for kt_sft (at most one row each), else 1."""
    if variant != "kt_sft":
        return 1
    return max(1, min(args.overlap, args.batch))


def trace_file(args: argparse.Namespace, variant: str) -> str | None:
    """--trace PATH for kt_sft; PATH with the variant's name before the suffix for the others."""
    if args.trace is None:
        return None
    path = Path(args.trace)
    if variant == "kt_sft":
        return str(path)
    return str(path.with_name(f"{path.stem}_{variant}{path.suffix or '.json'}"))


def worker_main(args: argparse.Namespace) -> int:
    import torch

    try:
        result = run_variant(args, args.worker, args.worker_layers)
    except torch.cuda.OutOfMemoryError as error:
        print(json.dumps({"oom": True, "error": str(error)[:500]}))
        return OOM_EXIT
    except KtKernelUnavailable as error:
        traceback.print_exc()
        print("E2E-UNAVAILABLE " + json.dumps({"reason": str(error)}))
        return UNAVAILABLE_EXIT
    print("E2E-RESULT " + json.dumps(result))
    return 0


# -- the parent: variants one by one, then the report --------------------------------------------------------


def spawn(args: argparse.Namespace, variant: str, layers: int) -> dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--worker-layers", str(layers)]
    command += forwarded_flags(args)
    print(f"[e2e] {variant}: {layers} layers ...", flush=True)
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode == OOM_EXIT:
        return {"oom": True}
    if completed.returncode == UNAVAILABLE_EXIT:
        marker = "E2E-UNAVAILABLE "
        line = next(line for line in reversed(completed.stdout.splitlines()) if line.startswith(marker))
        return {"could_not_run": json.loads(line.removeprefix(marker))["reason"]}
    if completed.returncode < 0:
        return {"error": f"killed by signal {-completed.returncode} (out of host memory?)"}
    if completed.returncode != 0:
        return {"error": completed.stderr[-3000:] or f"exit code {completed.returncode}"}
    line = next(line for line in reversed(completed.stdout.splitlines()) if line.startswith("E2E-RESULT "))
    return json.loads(line.removeprefix("E2E-RESULT "))


def forwarded_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--seq-len", str(args.seq_len), "--batch", str(args.batch), "--steps", str(args.steps)]
    flags += ["--warmup", str(args.warmup), "--split-steps", str(args.split_steps)]
    if args.tiny:
        flags.append("--tiny")
    if args.gradient_checkpointing:
        flags.append("--gradient-checkpointing")
    flags += ["--shape", args.shape, "--overlap", str(args.overlap), "--weight-dtype", args.weight_dtype]
    if args.trace is not None:
        flags += ["--trace", str(Path(args.trace).resolve())]
    if args.threads is not None:
        flags += ["--threads", str(args.threads)]
    if args.torch_threads is not None:
        flags += ["--torch-threads", str(args.torch_threads)]
    flags += ["--kt-kernel-path", str(args.kt_kernel_path), "--kt-threads", str(args.kt_threads)]
    return flags


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        import kt_sft_kernels

        features = kt_sft_kernels.cpu_features()
        info["cpu"] = f"{features.get('vendor', '')} {features.get('brand', '')}".strip()
        info["kernel_tier"] = kt_sft_kernels.active_isa()
        info["physical_cores"] = kt_sft_kernels.physical_cores()
    except ImportError as error:
        info["kernels"] = f"not importable: {error}"
    info["logical_cpus"] = os.cpu_count()
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            info["host_ram_gib"] = int(line.split()[1]) * 1024 / GIB
    from importlib import metadata

    info["versions"] = {}
    for name in ("torch", "transformers", "peft", "kt-sft-train", "kt-sft-kernels"):
        try:
            info["versions"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info["versions"][name] = "not installed"
    return info


def kt_kernel_probe(kt_path: Path) -> dict[str, Any]:
    """Which kt-kernel build this CPU gets and its SFT classes (loaded in the parent, which never imports
    kt_kernel itself: a second load of the extension in one process fails)."""
    try:
        return _bench_kt.probe(kt_path)
    except (ImportError, OSError) as error:
        return {"error": f"{type(error).__name__}: {error}"}


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [
        f"# End-to-end LoRA training, {report['model']}",
        "",
        f"Machine: {machine.get('cpu', '?')} ({machine.get('logical_cpus')} CPUs, kernel tier "
        f"{machine.get('kernel_tier', '?')}), {machine.get('host_ram_gib', 0):.0f} GiB RAM, GPU "
        f"{report['gpu']}; " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()) + ".",
        f"Sequence {report['seq_len']} tokens x batch {report['batch']}, LoRA r=16 on q/k/v/o + routed "
        f"experts, AdamW (fused); {report['steps']} timed steps after {report['warmup']} warm-up steps.",
        "",
        "| variant | layers | tokens/s | step (s) | ms/layer | GPU peak (GiB) | host peak (GiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["results"]:
        if "could_not_run" in row:
            reason = row["could_not_run"].replace("|", "/")
            lines.append(f"| {LABELS[row['variant']]} | - | - | - | - | - | could not run: {reason} |")
            continue
        if "tokens_per_s" not in row:
            reason = (
                "out of GPU memory at every depth" if row.get("oom") else row.get("error", "failed")[-200:]
            )
            lines.append(f"| {LABELS[row['variant']]} | - | - | - | - | - | {reason.splitlines()[-1]} |")
            continue
        gpu = f"{row['gpu_peak_gib']:.1f}" if "gpu_peak_gib" in row else "-"
        lines.append(
            f"| {row['label']} | {row['layers']} | {row['tokens_per_s']:,.0f} | {row['step_time_s']:.3f} | "
            f"{row['ms_per_layer']:.1f} | {gpu} | {row['host_peak_gib']:.1f} |"
        )
    # The StepTimer split is clearest without threads (with them, both threads' CPU time is summed).
    splits = [r for r in report["results"] if r["variant"] in KT_SFT_VARIANTS and "split_s" in r]
    kt = min(splits, key=lambda r: r.get("microbatches", 1), default=None)
    if kt is not None:
        split = kt["split_s"]
        total = split["total"] or 1.0
        lines += [
            "",
            f"{kt['label']} step-time split (StepTimer, mean of {report['split_steps']} instrumented steps, "
            f"{split['total']:.3f} s/step): GPU and rest {split['gpu_and_rest'] / total:.0%}, CPU experts "
            f"({kt.get('kernel_tier', '?')}) {split['cpu_experts'] / total:.0%}, host<->GPU transfers "
            f"{split['transfers'] / total:.0%} (with micro-batch threads the CPU time of both threads is "
            "summed: see the traced step below for what ran at the same time).",
        ]
    for row in report["results"]:
        if "trace" in row:
            lines += ["", trace_line(row)]
    kt_kernel = next((r for r in report["results"] if r["variant"] == "kt_kernel"), None)
    if kt_kernel is not None:
        lines += [
            "",
            "kt-kernel runs its own SFT wrapper (wrap_moe_layers_with_kt_wrapper + kt_adapt_peft_lora, "
            "AMXBF16 backend): its expert LoRA has separate gate and up A matrices and is bf16, so it "
            "trains ~32% more expert LoRA values than the PEFT layout the other rows use "
            f"(expert LoRA values: {expert_lora_summary(report['results'])}); no step-time split for it.",
        ]
    lines += ["", "ms/layer = step time / decoder layers: compares variants measured at different depths."]
    return "\n".join(lines) + "\n"


def trace_line(row: dict[str, Any]) -> str:
    """The traced step of a kt-sft variant: busy fractions, overlap and retained host bytes."""
    t = row["trace"]

    def share(key: str) -> str:
        return "-" if t.get(key) is None else f"{t[key]:.0%}"

    gib = t["retained_host_bytes_peak"] / GIB
    per_layer = t["retained_host_bytes_per_layer_token"]
    per_step = per_layer * row["batch"] * row["seq_len"] / GIB
    return (
        f"{row['label']}, one traced step ({t['step_s']:.3f} s, "
        f"{row.get('microbatches', 1)} micro-batch(es), "
        f"checkpointing {'on' if row.get('gradient_checkpointing') else 'off'}): CPU experts busy "
        f"{share('cpu_busy_fraction')}, GPU busy {share('gpu_busy_fraction')}, both at once "
        f"{share('overlap_fraction')} of the step; CPU activations retained: peak {gib:.2f} GiB, "
        f"{per_layer / 1024:.1f} KiB per layer per token ({per_step:.2f} "
        f"GiB per layer per step)" + (f"; trace {row['trace_path']}" if "trace_path" in row else "") + "."
    )


def expert_lora_summary(results: list[dict[str, Any]]) -> str:
    counts = [f"{r['variant']} {r['expert_lora_params']:,}" for r in results if "expert_lora_params" in r]
    return ", ".join(counts) or "none measured"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if "tokens_per_s" in r]
    if not rows:
        return
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    names = [f"{r['label']}\n({r['layers']} layers)" for r in rows]
    left.barh(names, [r["ms_per_layer"] for r in rows], color="#1f4e8c")
    left.set_xlabel("ms per decoder layer per step (lower is better)")
    left.invert_yaxis()
    kt = next((r for r in rows if r["variant"] in KT_SFT_VARIANTS and "split_s" in r), None)
    if kt is not None:
        split = kt["split_s"]
        parts = [("GPU and rest", split["gpu_and_rest"]), ("CPU experts", split["cpu_experts"]),
                 ("transfers", split["transfers"])]  # fmt: skip
        start = 0.0
        for (label, value), color in zip(parts, ("#6a9fd8", "#e08a3c", "#888888"), strict=True):
            right.barh(["kt-sft step"], [value], left=start, label=label, color=color)
            start += value
        right.set_xlabel("seconds per step")
        right.legend(loc="upper right", fontsize=8)
    else:
        right.set_axis_off()
    figure.suptitle(f"LoRA training, {report['model']}, seq {report['seq_len']}")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def parent_main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    results = []
    for variant in variants:
        depth = args.layers
        while True:
            result = spawn(args, variant, depth)
            if not (result.get("oom") and variant == "hf_all_gpu" and depth > 1):
                break
            print(f"[e2e] {variant}: out of GPU memory at {depth} layers, trying {depth // 2}", flush=True)
            depth //= 2
        result.setdefault("variant", variant)
        if variant == "kt_kernel" and "could_not_run" in result:
            build = _bench_kt.unavailable_reason(kt_kernel_probe(Path(args.kt_kernel_path)), "bf16")
            if build is not None:  # the root cause where kt-kernel's own message is generic
                result["could_not_run"] += f"; {build}"
        results.append(result)
        summary = {
            k: result[k]
            for k in ("tokens_per_s", "layers", "gpu_peak_gib", "host_peak_gib", "host_huge_pages_gib")
            if k in result
        }
        print(f"[e2e] {variant}: {summary or result}", flush=True)
    first = next((r for r in results if "device" in r), {})
    machine = machine_info()
    if "kt_kernel" in variants:
        machine["kt_kernel"] = kt_kernel_probe(Path(args.kt_kernel_path))
    report = {
        "model": "tiny Qwen3-MoE"
        if args.tiny
        else f"Qwen3-30B-A3B architecture ({args.layers} of 48 layers)"
        if args.shape == "qwen3-30b-a3b"
        else f"DeepSeek-V3 MoE widths on Qwen3-MoE layers ({args.layers} layers)",
        "machine": machine,
        "gpu": {"cpu": "none (CPU only)"}.get(first.get("device", "?"), first.get("device", "?")),
        "seq_len": args.seq_len,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "split_steps": args.split_steps,
        "results": results,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(markdown(report))
    plot(report, out / "results.png")
    print(markdown(report))
    print(f"[e2e] wrote {out / 'results.json'}, results.md, results.png")
    return 0 if all("tokens_per_s" in r or "could_not_run" in r for r in results) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="bench-e2e", help="output directory")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 8 of 48; tiny 2)")
    parser.add_argument(
        "--seq-len", type=int, default=None, help="tokens per sequence (default 2048; tiny 64)"
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--split-steps", type=int, default=2, help="instrumented kt-sft steps for the split")
    parser.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated, from {', '.join(VARIANTS)} (default: all but kt_kernel)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="kt-sft kernel threads (default: all cores)"
    )
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    parser.add_argument(
        "--kt-kernel-path",
        default=str(_bench_kt.default_path(REPO_ROOT)),
        help="kt-kernel's unpacked wheel folder, with a gguf wheel in it (default <repo>/.kt_kernel/py3XX)",
    )
    parser.add_argument(
        "--kt-threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 1),
        help="kt-kernel's cpuinfer threads (default CPUs - 1, its best in benchmarks/bench_moe.py)",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        "--grad-ckpt",
        action="store_true",
        help="gradient checkpointing (non-reentrant); kt-sft keeps the CPU experts' activations",
    )
    parser.add_argument(
        "--shape",
        choices=SHAPES,
        default="qwen3-30b-a3b",
        help="layer widths: Qwen3-30B-A3B (default) or DeepSeek-V3's MoE widths (E256 H7168 I2048)",
    )
    parser.add_argument(
        "--overlap",
        type=int,
        default=2,
        help="micro-batches in flight for variant kt_sft (rows of --batch; kt_sft_no_overlap runs 1)",
    )
    parser.add_argument(
        "--trace",
        default=None,
        help="kt_sft's merged Chrome trace of one step goes here (other kt-sft variants: STEM_VARIANT)",
    )
    parser.add_argument(
        "--weight-dtype",
        choices=("bf16", "int8", "int4"),
        default="bf16",
        help="kt-sft variants' frozen expert base (int4: group 128); the other variants stay bf16",
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny Qwen3-MoE (runs on a CPU in seconds)")
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="RESULTS_JSON",
        help="only write one results.json/.md/.png into --out from the rows of earlier runs' results.json "
        "(runs of one model and sequence length, e.g. one device call's separate variants)",
    )
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-layers", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.seq_len is None:
        args.seq_len = 64 if args.tiny else 2048
    if args.layers is None:
        args.layers = 2 if args.tiny else 8
    for name in ("layers", "seq_len", "batch", "steps", "kt_threads", "overlap"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def merge_main(paths: list[str], out: Path) -> int:
    reports = [json.loads(Path(p).read_text()) for p in paths]
    keys = {(r["model"], r["seq_len"], r["batch"]) for r in reports}
    if len(keys) != 1:
        raise SystemExit(f"--merge: the runs differ in model / seq_len / batch: {sorted(keys)}")
    report = dict(reports[0], results=[row for r in reports for row in r["results"]])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(markdown(report))
    plot(report, out / "results.png")
    print(markdown(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.merge:
        return merge_main(args.merge, Path(args.out))
    if args.worker is not None:
        return worker_main(args)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
