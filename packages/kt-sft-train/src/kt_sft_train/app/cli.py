"""The `kt-sft` command: train, info, export, bench.

kt-sft train                                   the embedded default job (tiny Qwen3-MoE, no download)
kt-sft train --model DIR --data FILE.jsonl     LoRA-tune a local HF checkpoint
kt-sft info                                    CPU tiers, threads, NUMA, GPUs, RAM, what fits
kt-sft export --adapter DIR --model DIR --out DIR [--merge]
kt-sft bench                                   times one experts layer, kernels vs PyTorch (app/bench.py)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from ..versions import __version__

PROG = "kt-sft"


class UsageError(ValueError):
    """A command-line mistake; printed without a traceback."""


# -- parser ---------------------------------------------------------------------------------------------


def _default_of(flag: str) -> Any:
    """The TrainOptions (or KTConfig) default of a train flag: options.py is the one place for defaults."""
    from ..config import KTConfig
    from .options import TrainOptions

    name = flag.removeprefix("--").replace("-", "_")
    for field in (*fields(TrainOptions), *fields(KTConfig)):
        if field.name == name and field.default is not MISSING:
            return field.default
    return MISSING


def _add(group: Any, flag: str, **kwargs: Any) -> None:
    # Unset flags are absent from the namespace, so job.json / YAML values are only overridden when given.
    help_text = kwargs.pop("help", "")
    default = _default_of(flag)
    is_switch = kwargs.get("action") in ("store_true", "store_false")
    if "default" not in help_text and not is_switch and default not in (None, MISSING):
        help_text = f"{help_text} (default: {default})"
    group.add_argument(flag, default=argparse.SUPPRESS, help=help_text, **kwargs)


def _numa_shards(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="LoRA fine-tuning of MoE models with the routed experts on CPU kernels.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser(
        "train",
        help="LoRA fine-tuning (no arguments: the embedded default job)",
        description="LoRA fine-tuning with the routed experts on the CPU kernels. With no --model/--data it "
        "runs the embedded default job (a tiny pre-trained Qwen3-MoE and a new task variant).",
    )
    source = train.add_argument_group("model and data")
    _add(source, "--model", metavar="DIR", help="local Hugging Face checkpoint directory (safetensors)")
    _add(source, "--data", metavar="FILE", help="training JSONL: {prompt, completion} or {messages} records")
    _add(source, "--heldout", metavar="FILE", help="JSONL scored by exact match before and after training")
    train.add_argument(
        "--job",
        metavar="DIR",
        default=None,
        help="a job directory (model/, train.jsonl, heldout.jsonl, job.json); default: embedded",
    )
    _add(
        source,
        "--config",
        metavar="YAML",
        help="YAML with a KTConfig mapping, or `kt:` and `train:` sections (train: takes these options)",
    )
    _add(
        source,
        "--output",
        metavar="DIR",
        help="the run folder, exactly (default: a new ./kt-sft-output/run-YYYYMMDD-HHMMSS per run)",
    )
    _add(
        source,
        "--chat-template",
        choices=("auto", "off"),
        help="use the tokenizer's chat template when it has one (auto, default) or never (off)",
    )

    lora = train.add_argument_group("LoRA")
    _add(lora, "--lora-r", type=int, metavar="R", help="rank (default 16)")
    _add(lora, "--lora-alpha", type=float, metavar="A", help="alpha (default 2 x rank)")
    _add(
        lora,
        "--lora-targets",
        metavar="LIST",
        help="comma list of: attention, experts, or module names (default attention,experts)",
    )

    _add(
        lora,
        "--lora-dropout",
        type=float,
        metavar="P",
        help="dropout on the input of the attention/dense LoRA only (PEFT cannot drop the input of the "
        "expert parameter targets); saved adapters record 0, as inference ignores it",
    )

    loop = train.add_argument_group("training")
    _add(loop, "--steps", type=int, help="optimizer steps (default: one epoch)")
    _add(loop, "--epochs", type=float, help="epochs over the data (instead of --steps)")
    _add(loop, "--batch-size", type=int, help="sequences per micro-batch (default 4)")
    _add(loop, "--grad-accum", type=int, metavar="N", help="micro-batches per optimizer step (default 1)")
    _add(loop, "--max-seq-len", type=int, metavar="N", help="truncate sequences to N tokens (default 1024)")
    _add(loop, "--lr", type=float, help="peak learning rate (default 2e-4)")
    _add(
        loop,
        "--lr-scheduler",
        choices=("constant", "linear", "cosine"),
        help="after warmup (default constant)",
    )
    _add(loop, "--warmup-steps", type=int, metavar="N", help="linear warmup steps from 0 to --lr")
    _add(loop, "--weight-decay", type=float, help="AdamW weight decay")
    _add(loop, "--max-grad-norm", type=float, help="gradient clipping (default 1.0)")
    _add(loop, "--seed", type=int, help="seed of the LoRA init and the data order (default 0)")
    _add(
        loop,
        "--gradient-checkpointing",
        action="store_true",
        help="recompute dense activations in the backward (CPU expert activations are retained)",
    )
    _add(
        loop,
        "--overlap",
        type=int,
        metavar="N",
        dest="overlap_microbatches",
        help="split each batch into N micro-batches on threads of their own, so one's CPU experts run "
        "while the GPU computes another's dense part (default 1 = off; 2 on a GPU host)",
    )
    _add(
        loop,
        "--no-overlap",
        action="store_const",
        const=1,
        dest="overlap_microbatches",
        help="one micro-batch at a time (same as --overlap 1)",
    )

    system = train.add_argument_group("hardware")
    _add(
        system,
        "--threads",
        type=int,
        help="CPU threads for the experts kernels and torch (default: all cores of the process)",
    )
    _add(
        system,
        "--numa-shards",
        type=_numa_shards,
        metavar="N|auto",
        help="split each experts layer over N NUMA shards (auto: one per node; default 1; ADR 0701)",
    )
    _add(system, "--backend", choices=("kernels", "reference"), help="experts backend (default kernels)")
    _add(
        system,
        "--weight-dtype",
        choices=("bf16", "int8", "int4"),
        help="frozen expert base in the kernels (default bf16; int8/int4 quantized while loading, an int4 "
        "checkpoint needs int4)",
    )
    _add(
        system,
        "--group-size",
        type=int,
        choices=(32, 64, 128),
        help="int4 group size (default: the checkpoint's, else the largest of 128/64/32 that fits)",
    )
    _add(
        system,
        "--quantized-cache",
        metavar="DIR",
        help="keep the int8/int4 experts quantized from a bf16/fp8 checkpoint in DIR; later runs read them "
        "back instead of quantizing again (ADR 0604)",
    )
    _add(system, "--device", choices=("auto", "cpu", "cuda"), help="where the dense part runs (default auto)")
    _add(
        system,
        "--dtype",
        choices=("auto", "bf16", "fp32"),
        help="dense-part dtype (auto: bf16 on GPU, fp32 on CPU)",
    )

    run = train.add_argument_group("evaluation, checkpoints, output")
    _add(run, "--eval-max-new-tokens", type=int, metavar="N", help="greedy tokens per held-out prompt")
    _add(run, "--eval-limit", type=int, metavar="N", help="held-out prompts to score (default 64)")
    _add(run, "--eval-batch-size", type=int, metavar="N", help="held-out prompts generated at once")
    _add(run, "--save-every", type=int, metavar="N", help="checkpoint every N steps (always at the end)")
    _add(
        run,
        "--save-every-minutes",
        type=float,
        metavar="M",
        help="also checkpoint when M minutes passed since the last one; 0: off (default 10)",
    )
    _add(
        loop,
        "--skip-nonfinite-steps",
        action="store_true",
        help="skip an optimizer step whose loss or gradients are NaN/Inf (default: stop, naming the tensor)",
    )
    _add(run, "--keep-checkpoints", type=int, metavar="N", help="checkpoints to keep (default 2)")
    _add(run, "--log-every", type=int, metavar="N", help="metrics.jsonl every N steps (default 1)")
    _add(
        run,
        "--resume",
        action="store_true",
        help="continue the run in --output from its last checkpoint with the options in its run.json",
    )
    _add(run, "--overwrite", action="store_true", help="replace a previous run in the output directory")
    _add(
        run,
        "--report-to",
        metavar="LIST",
        help="also send the metrics to: none, tensorboard, wandb, mlflow (comma list; the tool's own "
        "library must be installed)",
    )
    train.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=argparse.SUPPRESS,
        help="no progress bars (training, and transformers' weight loading)",
    )
    train.set_defaults(handler=command_train)

    info = commands.add_parser("info", help="hardware, kernel tiers, versions, which models fit")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.add_argument(
        "--model",
        metavar="DIR",
        default=None,
        help="also estimate the host bytes of this checkpoint's experts in bf16/int8/int4 (config.json only)",
    )
    info.set_defaults(handler=command_info)

    export = commands.add_parser(
        "export",
        help="merge an adapter into a checkpoint, or convert it to per-expert LoRA for serving engines",
    )
    export.add_argument("--adapter", required=True, metavar="DIR", help="PEFT adapter saved by kt-sft train")
    export.add_argument("--model", required=True, metavar="DIR", help="the base checkpoint it was trained on")
    export.add_argument("--out", required=True, metavar="DIR", help="output directory")
    export.add_argument(
        "--merge",
        action="store_true",
        help="write base + LoRA as a plain checkpoint (default: a per-expert PEFT adapter)",
    )
    export.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32"),
        default=None,
        help="dtype of a merged checkpoint (default: the base's)",
    )
    export.set_defaults(handler=command_export)

    bench = commands.add_parser(
        "bench",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="a short timing of one experts layer, kernels vs PyTorch",
        description="Times one experts layer, kernels vs PyTorch (part of the installed package). The "
        "comparison with peer implementations is benchmarks/bench_moe.py in a source checkout.",
    )
    bench.add_argument(
        "--tokens", type=int, default=None, help="tokens per forward (default 512; --full: 128, 512, 2048)"
    )
    bench.add_argument("--experts", type=int, default=64, help="routed experts of the layer")
    bench.add_argument("--top-k", type=int, default=8, help="experts per token")
    bench.add_argument("--hidden", type=int, default=1024, help="hidden size")
    bench.add_argument("--intermediate", type=int, default=512, help="expert intermediate size")
    bench.add_argument("--rank", type=int, default=16, help="LoRA rank")
    bench.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="timed steps of ours (median); PyTorch: 1 step (--full: this many)",
    )
    bench.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for both backends (default: the kernels' default rule)",
    )
    bench.add_argument(
        "--full",
        action="store_true",
        help="every kernel tier (and avx512_bf16 variant) this host runs, at T = 128, 512, 2048 (minutes)",
    )
    bench.add_argument(
        "--no-reference", dest="reference", action="store_false", help="skip the PyTorch reference timing"
    )
    bench.set_defaults(handler=command_bench)
    return parser


# -- commands -------------------------------------------------------------------------------------------


def command_train(args: argparse.Namespace) -> int:
    from .options import read_config_file, resolve
    from .training import run_training

    values = {k: v for k, v in vars(args).items() if k not in ("command", "handler", "job")}
    options = resolve(values, job_dir=args.job, config=read_config_file(values.get("config")))
    run_training(options)
    return 0


def command_info(args: argparse.Namespace) -> int:
    from .info import gather, render

    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        raise UsageError(f"--model {args.model!r} is not a checkpoint directory (no config.json)")
    info = gather(model=args.model)
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0


_EXPORT_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def command_export(args: argparse.Namespace) -> int:
    import torch

    from ..adapters import export_merged_checkpoint, export_per_expert_adapter

    adapter, model, out = Path(args.adapter), Path(args.model), Path(args.out)
    if not (model / "config.json").is_file():
        raise UsageError(f"--model {str(model)!r} is not a checkpoint directory (no config.json)")
    if out.resolve() in (adapter.resolve(), model.resolve()):
        raise UsageError("--out must differ from --adapter and --model")
    if args.merge:
        dtype = None if args.dtype is None else getattr(torch, _EXPORT_DTYPES[args.dtype])
        export_merged_checkpoint(model, adapter, out, dtype=dtype)
        print(f"merged checkpoint written to {out} (load it with AutoModelForCausalLM.from_pretrained)")
        if _ships_int4(model):
            print(
                "note: the base ships int4 experts; they were dequantized (q x scale, exact), LoRA added, "
                f"and written as {args.dtype or 'bf16'}: re-quantize with your serving stack if you need int4"
            )
    else:
        if args.dtype is not None:
            raise UsageError("--dtype applies to --merge only")
        export_per_expert_adapter(adapter, out, base_dir=model)
        print(f"per-expert LoRA adapter written to {out} (gate/up/down LoRA per expert, checkpoint names)")
    return 0


def _ships_int4(model: Path) -> bool:
    from transformers import AutoConfig

    from ..quantization import pack_quantized_scheme

    return pack_quantized_scheme(AutoConfig.from_pretrained(model, local_files_only=True)) is not None


def command_bench(args: argparse.Namespace) -> int:
    from .._kernels import load_kernels
    from .bench import LayerShape, kernel_configs, machine_lines, render, run

    for name in ("tokens", "experts", "top_k", "hidden", "intermediate", "rank", "repeat", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    kk = load_kernels()
    threads = args.threads or kk.default_thread_count()
    print("\n".join(machine_lines(kk, threads)), flush=True)
    configs = kernel_configs(kk, args.full)
    token_counts = [args.tokens] if args.tokens else ([128, 512, 2048] if args.full else [512])
    for tokens in token_counts:
        shape = LayerShape(tokens, args.experts, args.top_k, args.hidden, args.intermediate, args.rank)
        rows = run(
            shape,
            repeat=args.repeat,
            threads=threads,
            include_reference=args.reference,
            configs=configs,
            reference_repeat=args.repeat if args.full else 1,
        )
        print(render(shape, rows), flush=True)
    return 0


# -- entry point ----------------------------------------------------------------------------------------


def _known_errors() -> tuple[type[BaseException], ...]:
    from ..adapters import AdapterError
    from ..arch import UnsupportedModelError
    from ..config import KTConfigError
    from ..weights import CheckpointError
    from .data import DataError
    from .nonfinite import NonFiniteError
    from .options import OptionsError

    return (
        UsageError,
        OptionsError,
        DataError,
        KTConfigError,
        AdapterError,
        CheckpointError,
        NonFiniteError,
        UnsupportedModelError,
        NotImplementedError,
        FileNotFoundError,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args))
    except _known_errors() as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print(f"{PROG}: {interrupted_message(interrupt)}", file=sys.stderr)
        return 130


def interrupted_message(interrupt: KeyboardInterrupt) -> str:
    """Names --resume only when there is a checkpoint to resume from."""
    checkpoint = getattr(interrupt, "checkpoint", None)
    if checkpoint is None:
        return "interrupted (no checkpoint was saved, nothing to resume)"
    output = getattr(interrupt, "output", checkpoint.parent.parent)
    return (
        f"interrupted; checkpoint {checkpoint.name} saved: continue with "
        f"`{PROG} train --resume --output {output}`"
    )


if __name__ == "__main__":
    sys.exit(main())
