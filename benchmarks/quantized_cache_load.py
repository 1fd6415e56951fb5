"""Load time of a quantized expert base with and without the quantized-experts cache (ADR 0604).

    python benchmarks/quantized_cache_load.py --layers 2 --repeats 3 --out _out/qcache

Writes a random bf16 Qwen3-MoE checkpoint with real expert widths (default Qwen3-30B-A3B: 128 experts,
hidden 2048, expert intermediate 768; tiny vocabulary and attention) to a scratch folder, then times
`load_kt_model` per weight dtype, rows interleaved round by round: "quantize" (no cache: read bf16,
quantize), "quantize + write" (an empty cache: the first run) and "read cache" (the next runs), plus
the bf16 base for scale. Only the expert layers differ between rows; the rest of the load is the same
small model. The files are in the page cache (just written) unless --drop-caches (root) empties it
before every load: then the rows also pay for reading their bytes from the disk.
Prints a table, writes results.json and a bar plot (load seconds per row).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def write_checkpoint(path: Path, layers: int, experts: int, hidden: int, inter: int) -> None:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=512, hidden_size=hidden, intermediate_size=inter, moe_intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        num_experts=experts, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
        max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)


def load_seconds(path: Path, kt: Any, drop_caches: bool) -> tuple[float, Any]:
    import gc

    from kt_sft_train.model import load_kt_model
    from kt_sft_train.quantized_cache import quantized_cache_report

    gc.collect()
    if drop_caches:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    start = time.perf_counter()
    model = load_kt_model(path, kt, device_map={"": "cpu"})
    seconds = time.perf_counter() - start
    report = quantized_cache_report(model)
    del model
    return seconds, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--shape", default="128x2048x768", help="ExHxI (default Qwen3-30B-A3B)")
    parser.add_argument("--weight-dtypes", default="int8,int4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--drop-caches", action="store_true", help="empty the page cache before every load (root)"
    )
    parser.add_argument(
        "--scratch", default=None, help="folder for the checkpoint and caches (default: a temp dir)"
    )
    parser.add_argument("--out", default="_out/quantized_cache_load")
    args = parser.parse_args()

    import torch
    from _bench_machine import machine_info
    from kt_sft_train import KTConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    experts, hidden, inter = (int(v) for v in args.shape.split("x"))
    scratch = Path(tempfile.mkdtemp(prefix="kt-qcache-", dir=args.scratch))
    try:
        checkpoint = scratch / "model"
        write_checkpoint(checkpoint, args.layers, experts, hidden, inter)
        rows: dict[str, KTConfig] = {"bf16 base": KTConfig(threads=args.threads)}
        for dtype in args.weight_dtypes.split(","):
            base = KTConfig(
                threads=args.threads, weight_dtype=dtype, group_size=128 if dtype == "int4" else None
            )
            rows[f"{dtype}: quantize"] = base
            rows[f"{dtype}: quantize + write"] = base.replace(quantized_cache=str(scratch / f"empty-{dtype}"))
            rows[f"{dtype}: read cache"] = base.replace(quantized_cache=str(scratch / f"cache-{dtype}"))
        # Fill the caches the "read cache" rows read (not timed).
        for name, kt in rows.items():
            if name.endswith("read cache"):
                load_seconds(checkpoint, kt, drop_caches=False)
        times: dict[str, list[float]] = {name: [] for name in rows}
        for _ in range(args.repeats):
            for name, kt in rows.items():
                if name.endswith("quantize + write"):
                    shutil.rmtree(kt.quantized_cache, ignore_errors=True)  # type: ignore[arg-type]
                seconds, report = load_seconds(checkpoint, kt, args.drop_caches)
                expected = {"quantize + write": (0, args.layers), "read cache": (args.layers, 0)}
                for suffix, counts in expected.items():
                    if name.endswith(suffix):
                        assert report is not None and (report.read, report.written) == counts, (name, report)
                times[name].append(seconds)
        bf16_bytes = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
        cache_bytes = {
            dtype: sum(f.stat().st_size for f in (scratch / f"cache-{dtype}").rglob("*.safetensors"))
            for dtype in args.weight_dtypes.split(",")
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    info = machine_info()
    machine = (
        f"{info['cpu_model']} ({info['cpu_family_model']}), {info['cpus']} CPUs, {info['mem_total_gb']} GB"
    )
    print(f"machine: {machine}")
    print(
        f"checkpoint: {args.layers} layers x {experts} experts, hidden {hidden}, intermediate {inter}: "
        f"{bf16_bytes / 2**30:.2f} GiB bf16 on disk; cache "
        + ", ".join(f"{d} {b / 2**30:.2f} GiB" for d, b in cache_bytes.items())
    )
    print(f"{'row':<24} {'median s':>9} {'min s':>7}  (all)")
    for name, values in times.items():
        print(
            f"{name:<24} {statistics.median(values):9.2f} {min(values):7.2f}  {[round(v, 2) for v in values]}"
        )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "machine": machine, "layers": args.layers, "shape": args.shape, "drop_caches": args.drop_caches,
        "checkpoint_bytes": bf16_bytes, "cache_bytes": cache_bytes, "seconds": times,
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(times)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh(names, [statistics.median(times[n]) for n in names], color="tab:blue")
    ax.invert_yaxis()
    ax.set_xlabel("load_kt_model seconds (median)")
    ax.set_title(f"{args.layers} layers, {args.shape} bf16 checkpoint; {machine}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "quantized_cache_load.png", dpi=120)
    print(f"wrote {out / 'results.json'} and {out / 'quantized_cache_load.png'}")


if __name__ == "__main__":
    main()
