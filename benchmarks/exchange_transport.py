"""Host-owner exchange: gloo point-to-point vs shared-memory mailboxes, at real layer sizes (ADR 0801).

    python benchmarks/exchange_transport.py                       # Qwen3-30B-A3B + DeepSeek-V3 sizes
    python benchmarks/exchange_transport.py --ranks 2 4 --hidden 2048 --tokens 512 2048 8192

One process per rank on this machine (one "host"), gloo on 127.0.0.1. Per layer and training step each
non-owner does what the runtime does (kt_sft_train.distributed): forward = header + payload (x bf16 [T, H],
routing ids int64 [T, k], weights fp32 [T, k]) up, header + output rows (bf16 [T, H]) down; backward =
header + output grads up, header + dx and routing-weight grads down. The owner concatenates every rank's
rows (what it does before the kernel call) and sends each rank its rows back; no kernel runs, so the
times are the transport alone. Variants:

  gloo : payload packed into one buffer, isend/irecv on the host's gloo group (today's runtime)
  shm  : payload copied into the pair's /dev/shm mailbox (kt_sft_train.shm_transport), gloo header only

Variants alternate round-robin inside one run; the table shows the median over repeats of one layer's
forward + backward exchange as seen by rank 1 (a non-owner), and the payload bandwidth it implies.
Timing on a shared machine is noisy: compare the ratio, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TOP_K = 8
HEADER = 7


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pack(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.contiguous().view(torch.uint8).reshape(-1) for p in parts])


class Gloo:
    name = "gloo"

    def send(self, parts: list[torch.Tensor], dst: int) -> None:
        payload = _pack(parts)
        header = torch.tensor([0, 0, 0, 0, 0, 0, payload.numel()], dtype=torch.int64)
        works = [dist.isend(header, dst), dist.isend(payload, dst)]
        for w in works:
            w.wait()

    def recv(self, src: int) -> torch.Tensor:
        header = torch.empty(HEADER, dtype=torch.int64)
        dist.irecv(header, src).wait()
        payload = torch.empty(int(header[6]), dtype=torch.uint8)
        dist.irecv(payload, src).wait()
        return payload


class Shm:
    name = "shm"

    def __init__(self, run_id: str, rank: int) -> None:
        from kt_sft_train.shm_transport import ShmMailboxes

        self.boxes = ShmMailboxes(run_id, rank)

    def send(self, parts: list[torch.Tensor], dst: int) -> None:
        nbytes = self.boxes.write(dst, parts)
        header = torch.tensor([0, 0, 0, 0, 0, 0, nbytes], dtype=torch.int64)
        dist.isend(header, dst).wait()

    def recv(self, src: int) -> torch.Tensor:
        header = torch.empty(HEADER, dtype=torch.int64)
        dist.irecv(header, src).wait()
        return self.boxes.read(src, int(header[6]))


def _views(payload: torch.Tensor, specs: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    out, offset = [], 0
    for shape, dtype in specs:
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        out.append(payload[offset : offset + n].view(dtype).reshape(shape))
        offset += n
    return out


def layer_step(transport: Any, rank: int, world: int, tokens: int, hidden: int, data: dict) -> None:
    """One layer's forward + backward exchange (owner = rank 0)."""
    if rank != 0:
        transport.send([data["x"], data["ids"], data["w"]], 0)
        (out,) = _views(transport.recv(0), [((tokens, hidden), torch.bfloat16)])
        out = out.clone()
        transport.send([data["g"]], 0)
        reply = [((tokens, hidden), torch.bfloat16), ((tokens, TOP_K), torch.float32)]
        dx, dw = _views(transport.recv(0), reply)
        dx, dw = dx.clone(), dw.clone()
        return
    xs, all_ids, all_weights = [data["x"]], [data["ids"]], [data["w"]]
    specs = [
        ((tokens, hidden), torch.bfloat16),
        ((tokens, TOP_K), torch.int64),
        ((tokens, TOP_K), torch.float32),
    ]
    for src in range(1, world):
        x, ids, w = _views(transport.recv(src), specs)
        xs.append(x)
        all_ids.append(ids)
        all_weights.append(w)
    out = torch.cat(xs)  # the kernel's inputs (as the owner concatenates them); "output" = input here
    torch.cat(all_ids), torch.cat(all_weights)
    pieces = out.split(tokens)
    for dst in range(1, world):
        transport.send([pieces[dst]], dst)
    gs = [data["g"]]
    for src in range(1, world):
        (g,) = _views(transport.recv(src), [((tokens, hidden), torch.bfloat16)])
        gs.append(g)
    dx = torch.cat(gs).split(tokens)
    for dst in range(1, world):
        transport.send([dx[dst], data["w"]], dst)


def worker(rank: int, world: int, port: int, cases: list[tuple[int, int]], repeats: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    run_id = f"bench{port}"
    transports = [Gloo(), Shm(run_id, rank)]
    results = []
    for hidden, tokens in cases:
        g = torch.Generator().manual_seed(rank)
        data = {
            "x": torch.randn(tokens, hidden, generator=g).bfloat16(),
            "g": torch.randn(tokens, hidden, generator=g).bfloat16(),
            "ids": torch.randint(0, 128, (tokens, TOP_K), generator=g),
            "w": torch.rand(tokens, TOP_K, generator=g),
        }
        times: dict[str, list[float]] = {t.name: [] for t in transports}
        for t in transports:  # warm-up: segments sized, connections up
            layer_step(t, rank, world, tokens, hidden, data)
        for _ in range(repeats):
            for t in transports:  # round-robin
                dist.barrier()
                start = time.perf_counter()
                layer_step(t, rank, world, tokens, hidden, data)
                times[t.name].append(time.perf_counter() - start)
        if rank == 1:
            up = tokens * (hidden * 2 + TOP_K * 12) + tokens * hidden * 2
            down = tokens * hidden * 2 + tokens * (hidden * 2 + TOP_K * 4)
            row = {"ranks": world, "hidden": hidden, "tokens": tokens, "bytes_per_rank": up + down}
            for name, values in times.items():
                row[f"{name}_ms"] = statistics.median(values) * 1e3
            row["shm_speedup"] = row["gloo_ms"] / row["shm_ms"]
            results.append(row)
            print(json.dumps(row), flush=True)
    transports[1].boxes.close()
    dist.barrier()
    dist.destroy_process_group()
    if rank == 1:
        Path(out).write_text(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--hidden", type=int, nargs="+", default=[2048, 7168])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="exchange_transport.json")
    args = parser.parse_args()
    cases = [(h, t) for h in args.hidden for t in args.tokens]
    rows = []
    for world in args.ranks:
        part = f"{args.out}.{world}"
        mp.spawn(worker, args=(world, _free_port(), cases, args.repeats, part), nprocs=world, join=True)
        rows += json.loads(Path(part).read_text())
        Path(part).unlink()
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print("\n| ranks | hidden | T per rank | MiB per rank | gloo ms | shm ms | gloo / shm |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        mib = r["bytes_per_rank"] / 2**20
        print(
            f"| {r['ranks']} | {r['hidden']} | {r['tokens']} | {mib:.0f} | {r['gloo_ms']:.1f} | "
            f"{r['shm_ms']:.1f} | {r['shm_speedup']:.2f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
