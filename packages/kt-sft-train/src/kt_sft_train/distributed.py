"""One expert owner per host (DESIGN.md §4.6; docs/distributed.md; ADR 0801).

With `KTConfig(distributed="host_owner")` and an initialized default process group, one process per host
(local rank `owner_local_rank`, 0 by default) owns the CPU experts: its KTExperts hold the kernel (or
reference) layers and the expert LoRA. The other ranks of the host hold thin proxies without weights.
Each experts call is an exchange inside the host: headers on a per-host gloo group, payloads through
shared-memory mailboxes (shm_transport.py; KTConfig.exchange_transport="gloo" sends them over gloo too):

    forward : every non-owner sends (status, sizes) and one payload (x, routing ids, routing weights)
              to the owner; the owner runs ONE layer call on the concatenation of all local tokens
              (its own first, then local rank order) and sends each rank its rows of the output.
    backward: the same with the output grads, and dx + routing-weight grads back. The expert-LoRA
              grads stay on the owner.

That is 2 messages each way per non-owner per layer and pass (a fixed-size header, then the payload;
the payload is skipped for T = 0), i.e. per layer per training step 4 up + 4 down per non-owner rank.

Both sides execute the same layers in the same order in the forward and (reversed) in the backward, as
they run the same model, so the messages match without tags per layer. Under gradient checkpointing the
"retain" policy serves the recompute from the first pass (no exchange); "recompute" exchanges again in
the backward, on every rank alike.

Gradients: the dense part trains under DDP (all ranks average their grads). The owner's expert-LoRA
grads are the sum over its host's ranks; the owner scales them by 1/world_size in its backward, and
across hosts `sync_expert_grads` all-reduces (sums) them over the group of owners, so every gradient
equals DDP's mean over ranks. With per-rank losses that add up to world_size * (the global loss), e.g.
sum of token losses * world_size / global token count, that is single-process training on the global
batch.

Failures: every wait polls its async work with a deadline (`distributed_timeout_s`) and an error board
(a TCPStore of our own, created through torch.distributed's public API). A rank that fails inside an
exchange, or inside `failure_reporting()`, posts its error there first; a failing owner also sends a
failure status in its reply header. Every waiting rank then raises `HostOwnerError` with the original
message instead of waiting.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn

from .config import KTConfig
from .reference import ExpertGrads, ExpertLoRA
from .shm_transport import ShmMailboxes

ERROR_KEY = "kt_sft/error"
SEEN_KEY = "kt_sft/error_seen"
# Rank 0 serves the error board: after a failure it waits this long at most for the others to read it.
LINGER_S = 10.0
# Header: status, tokens, x dtype, ids dtype, weights dtype, save flag, payload bytes.
HEADER_LEN = 7
OK, FAILED = 0, 1
_DTYPES = (
    torch.float64,
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
)
_POLL_BOARD_S = 0.02


class HostOwnerError(RuntimeError):
    """A rank of a host-owner run failed (its message is included) or did not answer in time."""


# -- topology ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostLayout:
    """Which global ranks share a host, and which of them owns the experts."""

    hosts: tuple[tuple[int, ...], ...]
    owner_local_rank: int
    rank: int

    def __post_init__(self) -> None:
        for host in self.hosts:
            if self.owner_local_rank >= len(host):
                raise ValueError(
                    f"KTConfig.owner_local_rank={self.owner_local_rank} but host {list(host)} has only "
                    f"{len(host)} ranks"
                )

    @property
    def world_size(self) -> int:
        return sum(len(h) for h in self.hosts)

    @property
    def host_index(self) -> int:
        return next(i for i, h in enumerate(self.hosts) if self.rank in h)

    @property
    def members(self) -> tuple[int, ...]:
        return self.hosts[self.host_index]

    @property
    def owner(self) -> int:
        return self.members[self.owner_local_rank]

    @property
    def owners(self) -> tuple[int, ...]:
        return tuple(h[self.owner_local_rank] for h in self.hosts)

    @property
    def is_owner(self) -> bool:
        return self.rank == self.owner

    @property
    def is_adapter_writer(self) -> bool:
        """The one rank that writes the adapter: the owner of the first host."""
        return self.rank == self.owners[0]


def control_group_for(default_backend: str) -> Any:
    """A process group over all ranks that runs collectives on host (CPU) tensors with gloo.

    The default group when it serves CPU tensors with gloo ("gloo", or "cpu:gloo,cuda:nccl"); otherwise
    (e.g. "nccl", the default of accelerate and torchrun scripts on GPUs) a new gloo group over the world.
    The host-owner layout discovery, the error board's address, the saving barrier and the small
    all-reduces of clipping run on it, so an NCCL default group never sees a host tensor.
    """
    return dist.group.WORLD if gloo_serves_cpu(default_backend) else dist.new_group(backend="gloo")


def gloo_serves_cpu(backend: str) -> bool:
    """Whether a process group of `backend` ("gloo", "nccl", "cpu:gloo,cuda:nccl", ...) runs CPU tensors on
    gloo."""
    parts = [part.strip().split(":") for part in backend.lower().split(",")]
    return any(p == ["gloo"] or p == ["cpu", "gloo"] for p in parts)


def discover_layout(kt: KTConfig, control_group: Any = None) -> HostLayout:
    """The layout from `kt.hosts`, else from torchrun's GROUP_RANK (or the host name) of every rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if kt.hosts is not None:
        named = sum(len(h) for h in kt.hosts)
        if named != world:
            raise ValueError(f"KTConfig.hosts names {named} ranks but the world has {world}")
        return HostLayout(kt.hosts, kt.owner_local_rank, rank)
    key = os.environ.get("GROUP_RANK") or socket.gethostname()
    keys: list[Any] = [None] * world
    dist.all_gather_object(keys, key, group=control_group)
    grouped: dict[str, list[int]] = {}
    for r, k in enumerate(keys):
        grouped.setdefault(str(k), []).append(r)
    return HostLayout(tuple(sorted(tuple(v) for v in grouped.values())), kt.owner_local_rank, rank)


# -- the runtime: groups, error board, monitored waits -------------------------------------------------------


class HostOwnerRuntime:
    """Process groups and failure handling of one process in a host-owner run (one per process)."""

    def __init__(
        self, layout: HostLayout, timeout_s: float, control_group: Any, transport: str = "shm"
    ) -> None:
        self.layout = layout
        self.timeout_s = timeout_s
        self.control_group = control_group  # gloo over all ranks (control_group_for)
        timeout = timedelta(seconds=timeout_s)
        # Every rank creates every group, in the same order (torch.distributed's rule for new_group).
        self.host_group: Any = None
        for host in layout.hosts:
            group = dist.new_group(list(host), backend="gloo", timeout=timeout)
            if layout.rank in host:
                self.host_group = group
        owners_group = dist.new_group(list(layout.owners), backend="gloo", timeout=timeout)
        self.owners_group: Any = owners_group if layout.is_owner else None
        self.board, run_id = _open_board(timeout, control_group)
        # Payloads inside the host: shared-memory mailboxes (gloo carries the headers) or gloo.
        self.mailboxes = ShmMailboxes(run_id, layout.rank) if transport == "shm" else None
        if self.mailboxes is not None:
            atexit.register(self.mailboxes.close)
        self.expert_grads_pending = False
        self._failed = False
        self._acknowledged = False
        if layout.rank == 0:
            atexit.register(self.linger_after_failure)

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    # Failures ------------------------------------------------------------------------------------------

    def report(self, error: BaseException) -> None:
        """Post `error` on the board (first failure wins) so every waiting rank raises it."""
        if self._failed or isinstance(error, HostOwnerError):
            return
        self._failed = True
        text = f"rank {self.layout.rank} failed: {type(error).__name__}: {error}"
        try:
            self.board.compare_set(ERROR_KEY, "", text)
        except Exception as board_error:  # the others' deadline still ends their wait
            rank = self.layout.rank
            print(f"kt-sft: could not post the failure of rank {rank}: {board_error}", file=sys.stderr)

    def posted_failure(self) -> str | None:
        try:
            if self.board.check([ERROR_KEY]):
                return self.board.get(ERROR_KEY).decode("utf-8", "replace")
        except Exception:
            return None
        return None

    def raise_failure(self, what: str, fallback: str, grace_s: float = 1.0) -> NoReturn:
        """Raise HostOwnerError with the posted message (waiting `grace_s` for it), else `fallback`."""
        deadline = time.monotonic() + grace_s
        posted = self.posted_failure()
        while posted is None and time.monotonic() < deadline:
            time.sleep(_POLL_BOARD_S)
            posted = self.posted_failure()
        self._raise(f"{what}: {posted or fallback}")

    def _raise(self, message: str) -> NoReturn:
        self._failed = True
        if not self._acknowledged:  # tells rank 0 (the board's server) this rank is done with it
            self._acknowledged = True
            with contextlib.suppress(Exception):
                self.board.add(SEEN_KEY, 1)
        raise HostOwnerError(message)

    def linger_after_failure(self) -> None:
        """On rank 0 after a failure: keep serving the board until the others read it (bounded)."""
        if not self._failed or self.layout.rank != 0:
            return
        deadline = time.monotonic() + LINGER_S
        with contextlib.suppress(Exception):
            while self.board.add(SEEN_KEY, 0) < self.world_size - 1 and time.monotonic() < deadline:
                time.sleep(_POLL_BOARD_S)

    def post(self, what: str, operation: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Starts an async gloo operation. gloo refuses at once to post to a peer whose connection has
        already closed (it died): that is raised as the failure a wait would have seen."""
        try:
            return operation(*args, **kwargs)
        except NotImplementedError:
            raise
        except RuntimeError as error:
            self.raise_failure(what, f"{type(error).__name__}: {error}")

    def wait(self, works: Sequence[Any], what: str) -> None:
        """Wait for async `works`, raising HostOwnerError on a posted failure or after the timeout.

        gloo's point-to-point work completes only inside wait(), so a helper thread waits and this
        thread watches the board and the clock; after a failure the helper is left behind (it ends with
        the process group's own timeout or the process).
        """
        done = threading.Event()
        errors: list[BaseException] = []

        def wait_all() -> None:
            try:
                for work in works:
                    work.wait()
            except BaseException as error:
                errors.append(error)
            finally:
                done.set()

        threading.Thread(target=wait_all, name="kt-sft-exchange-wait", daemon=True).start()
        deadline = time.monotonic() + self.timeout_s
        while not done.wait(_POLL_BOARD_S):
            posted = self.posted_failure()
            if posted is not None:
                self._raise(f"{what}: {posted}")
            if time.monotonic() > deadline:
                self._raise(
                    f"{what}: no answer within {self.timeout_s:g} s (KTConfig.distributed_timeout_s); "
                    "a rank died or is stuck"
                )
        if errors:  # a peer vanished: prefer the message it posted
            self.raise_failure(what, f"{type(errors[0]).__name__}: {errors[0]}")

    # Point-to-point inside the host ----------------------------------------------------------------

    def group_for(self, tensor: torch.Tensor) -> Any:
        if tensor.device.type != "cpu":
            raise NotImplementedError(
                "host-owner exchange of device tensors (through NCCL) is not implemented yet; the experts "
                "exchange host-staged tensors over gloo"
            )
        return self.host_group

    def send_message(
        self, fields: Sequence[int], parts: Sequence[torch.Tensor], dst: int
    ) -> tuple[list[Any], list[torch.Tensor]]:
        """Send a header (`fields` + the payload's byte count) and the payload made of `parts` to `dst`.

        Returns the works to wait for and the tensors they read (keep them until then)."""
        if self.mailboxes is not None:
            nbytes = self.mailboxes.write(dst, parts)  # before the header, which tells dst it is there
            payload = None
        else:
            payload = _pack(parts)
            nbytes = payload.numel()
        header = torch.tensor([*fields, nbytes], dtype=torch.int64)
        works = [self.isend(header, dst)]
        if payload is not None and nbytes:
            works.append(self.isend(payload, dst))
        return works, [header] if payload is None else [header, payload]

    def receive_payload(self, src: int, nbytes: int) -> tuple[torch.Tensor, list[Any]]:
        """The payload announced by a header from `src` and the works to wait for before reading it (a
        mailbox payload is a view, valid until `src`'s next message)."""
        if self.mailboxes is not None:
            return self.mailboxes.read(src, nbytes), []
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        return buffer, [self.irecv(buffer, src)] if nbytes else []

    def isend(self, tensor: torch.Tensor, dst: int) -> Any:
        group = self.group_for(tensor)
        return self.post(f"sending to rank {dst}", dist.isend, tensor, dst=dst, group=group)

    def irecv(self, tensor: torch.Tensor, src: int) -> Any:
        group = self.group_for(tensor)
        return self.post(f"receiving from rank {src}", dist.irecv, tensor, src=src, group=group)


def _open_board(timeout: timedelta, control_group: Any) -> tuple[Any, str]:
    """A TCPStore for failure messages (rank 0 serves it on a free port, the others connect) and a run id
    that every rank shares (it names the run's shared-memory mailboxes)."""
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    if dist.get_rank() == 0:
        store = dist.TCPStore(host, 0, dist.get_world_size(), True, timeout=timeout, wait_for_workers=False)
        address = [host, store.port, secrets.token_hex(6)]
    else:
        address = [None, None, None]
    dist.broadcast_object_list(address, src=0, group=control_group)
    run_id = str(address[2])
    if dist.get_rank() == 0:
        return store, run_id
    store = dist.TCPStore(str(address[0]), int(address[1]), dist.get_world_size(), False, timeout=timeout)
    return store, run_id


_runtime: HostOwnerRuntime | None = None
_runtime_lock = threading.Lock()


def runtime_for(kt: KTConfig, default_backend: str | None = None) -> HostOwnerRuntime:
    """The process's host-owner runtime (created on first use; every rank must reach this together).

    default_backend: the default process group's backend (None: dist.get_backend()); it decides whether
        the host-tensor collectives need a gloo group of their own (control_group_for).
    """
    global _runtime
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "KTConfig(distributed='host_owner') needs torch.distributed initialized first "
            "(torchrun / accelerate launch, then init_process_group or Accelerator())"
        )
    with _runtime_lock:
        if _runtime is not None:
            wanted = (kt.owner_local_rank, kt.hosts, kt.distributed_timeout_s, kt.exchange_transport)
            have = (
                _runtime.layout.owner_local_rank,
                _runtime.config_hosts,
                _runtime.timeout_s,
                "gloo" if _runtime.mailboxes is None else "shm",
            )
            if wanted != have:
                raise ValueError(
                    "this process already runs host-owner experts with another owner_local_rank/hosts/"
                    f"timeout/exchange_transport {have}; one host layout per process"
                )
            return _runtime
        backend = dist.get_backend() if default_backend is None else default_backend
        control_group = control_group_for(str(backend))
        layout = discover_layout(kt, control_group)
        runtime = HostOwnerRuntime(layout, kt.distributed_timeout_s, control_group, kt.exchange_transport)
        runtime.config_hosts = kt.hosts  # type: ignore[attr-defined]
        _install_excepthook(runtime)
        _runtime = runtime
        return runtime


def current_runtime() -> HostOwnerRuntime | None:
    return _runtime


def shutdown() -> None:
    """Forget the runtime (before destroy_process_group; a new run builds a new one)."""
    global _runtime
    with _runtime_lock:
        if _runtime is not None and _runtime.mailboxes is not None:
            _runtime.mailboxes.close()
        _runtime = None


def _install_excepthook(runtime: HostOwnerRuntime) -> None:
    # An uncaught exception of a torchrun script reaches the other ranks with its message.
    previous = sys.excepthook

    def hook(kind: Any, value: Any, traceback: Any) -> None:
        if isinstance(value, BaseException):
            runtime.report(value)
        previous(kind, value, traceback)

    sys.excepthook = hook


@contextmanager
def failure_reporting() -> Iterator[None]:
    """Post any exception raised inside on the error board, so the other ranks fail with its message."""
    try:
        yield
    except BaseException as error:
        if _runtime is not None:
            _runtime.report(error)
        raise


# -- the experts layers of a host-owner run -----------------------------------------------------------------


def _code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype)


def _pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    parts = [t.contiguous().view(torch.uint8).reshape(-1) for t in tensors if t.numel()]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


def _unpack(
    payload: torch.Tensor, specs: Sequence[tuple[tuple[int, ...], torch.dtype]]
) -> list[torch.Tensor]:
    out, offset = [], 0
    for shape, dtype in specs:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        out.append(payload[offset : offset + nbytes].view(dtype).reshape(shape))
        offset += nbytes
    return out


@dataclass
class _PeerCall:
    """One non-owner's part of an owner call."""

    rank: int
    tokens: int
    x_dtype: torch.dtype
    ids_dtype: torch.dtype
    weights_dtype: torch.dtype
    save: bool


@dataclass
class OwnerHandle:
    inner: Any
    peers: list[_PeerCall]
    own_tokens: int
    own_weights_dtype: torch.dtype


@dataclass
class RemoteHandle:
    tokens: int
    x_dtype: torch.dtype
    weights_dtype: torch.dtype
    consumed: bool = field(default=False)


class OwnerLayer:
    """The owner's experts layer: runs `inner` once for the tokens of every rank of its host."""

    owns_experts = True

    def __init__(self, inner: Any, runtime: HostOwnerRuntime, label: str) -> None:
        self.inner = inner
        self.runtime = runtime
        self.label = label
        self.backend = inner.backend
        self.top_k = inner.top_k
        self.peers = [r for r in runtime.layout.members if r != runtime.layout.rank]

    def __deepcopy__(self, memo: dict[int, Any]) -> OwnerLayer:
        return self

    def host_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.inner.host_dtype(dtype)

    def load_weights(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        self.inner.load_weights(gate_up, down)

    def load_quantized(self, *tensors: torch.Tensor) -> None:
        self.inner.load_quantized(*tensors)

    def quantized_storage(self) -> tuple[torch.Tensor, ...]:
        return self.inner.quantized_storage()

    def forward(
        self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, lora: ExpertLoRA | None, save: bool
    ) -> tuple[torch.Tensor, OwnerHandle | None]:
        runtime = self.runtime
        what = f"{self.label} forward on the owner (rank {runtime.layout.rank})"
        headers = {r: torch.empty(HEADER_LEN, dtype=torch.int64) for r in self.peers}
        runtime.wait([runtime.irecv(headers[r], r) for r in self.peers], what)
        peers = []
        for r in self.peers:
            status, tokens, xd, idd, wd, peer_save, _ = headers[r].tolist()
            if status != OK:
                runtime.raise_failure(what, f"rank {r} sent a failure status")
            peers.append(_PeerCall(r, tokens, _DTYPES[xd], _DTYPES[idd], _DTYPES[wd], bool(peer_save)))
        payloads = self._receive_payloads(peers, headers, what)
        try:
            if any(p.save != save for p in peers):
                raise RuntimeError(
                    f"{self.label}: ranks disagree on whether the experts need a backward (grad enabled on "
                    f"ranks {[p.rank for p in peers if p.save] + ([runtime.layout.rank] if save else [])} "
                    "only); run the same grad mode on every rank"
                )
            xs, all_ids, all_weights = [x], [ids], [weights]
            for p in peers:
                top_k, hidden = self.top_k, x.shape[1]
                px, pids, pw = _unpack(
                    payloads[p.rank],
                    [
                        ((p.tokens, hidden), p.x_dtype),
                        ((p.tokens, top_k), p.ids_dtype),
                        ((p.tokens, top_k), p.weights_dtype),
                    ],
                )
                xs.append(px.to(x.dtype))
                all_ids.append(pids.to(ids.dtype))
                all_weights.append(pw.to(weights.dtype))
            out, inner_handle = self.inner.forward(
                torch.cat(xs), torch.cat(all_ids), torch.cat(all_weights), lora, save
            )
        except BaseException as error:
            self._fail(error, what)
            raise
        pieces = out.split([x.shape[0]] + [p.tokens for p in peers])
        self._reply(peers, [[piece.to(p.x_dtype)] for p, piece in zip(peers, pieces[1:], strict=True)], what)
        handle = OwnerHandle(inner_handle, peers, x.shape[0], weights.dtype) if save else None
        return pieces[0].clone(), handle

    def backward(self, handle: OwnerHandle, grad_out: torch.Tensor) -> ExpertGrads:
        if not isinstance(handle, OwnerHandle):
            raise TypeError(
                f"handle must come from OwnerLayer.forward(save=True), got {type(handle).__name__}"
            )
        runtime = self.runtime
        what = f"{self.label} backward on the owner (rank {runtime.layout.rank})"
        peers = handle.peers
        headers = {p.rank: torch.empty(HEADER_LEN, dtype=torch.int64) for p in peers}
        runtime.wait([runtime.irecv(headers[p.rank], p.rank) for p in peers], what)
        for p in peers:
            status, tokens = headers[p.rank].tolist()[:2]
            if status != OK:
                runtime.raise_failure(what, f"rank {p.rank} sent a failure status")
            if tokens != p.tokens:
                error = RuntimeError(
                    f"{self.label}: rank {p.rank} sent output grads for {tokens} tokens in the backward but "
                    f"{p.tokens} in the forward (ranks run the experts layers in different orders)"
                )
                self._fail(error, what)
                raise error
        payloads = self._receive_payloads(peers, headers, what)
        try:
            grads_out = [grad_out]
            for p in peers:
                (g,) = _unpack(
                    payloads[p.rank], [((p.tokens, grad_out.shape[1]), _DTYPES[int(headers[p.rank][2])])]
                )
                grads_out.append(g.to(grad_out.dtype))
            grads = self.inner.backward(handle.inner, torch.cat(grads_out))
        except BaseException as error:
            self._fail(error, what)
            raise
        sizes = [handle.own_tokens] + [p.tokens for p in peers]
        gx, gw = grads.grad_x.split(sizes), grads.grad_weights.split(sizes)
        replies = [[gx[i + 1].to(p.x_dtype), gw[i + 1].to(p.weights_dtype)] for i, p in enumerate(peers)]
        self._reply(peers, replies, what)
        # The owner holds the sum over its host's ranks; DDP averages the dense grads over all ranks.
        lora = tuple(None if g is None else g.mul_(1.0 / runtime.world_size) for g in grads.lora)
        if any(g is not None for g in lora):
            runtime.expert_grads_pending = True
        return ExpertGrads(grad_x=gx[0].clone(), grad_weights=gw[0].clone(), lora=lora)

    def _receive_payloads(
        self, peers: Sequence[_PeerCall], headers: dict[int, torch.Tensor], what: str
    ) -> dict[int, torch.Tensor]:
        payloads, works = {}, []
        for p in peers:
            payloads[p.rank], receiving = self.runtime.receive_payload(p.rank, int(headers[p.rank][6]))
            works += receiving
        self.runtime.wait(works, what)
        return payloads

    def _reply(
        self, peers: Sequence[_PeerCall], tensors: Sequence[Sequence[torch.Tensor]], what: str
    ) -> None:
        runtime = self.runtime
        works, keep = [], []
        for p, parts in zip(peers, tensors, strict=True):
            sending, tensors_sent = runtime.send_message([OK, p.tokens, 0, 0, 0, 0], parts, p.rank)
            works += sending
            keep += tensors_sent
        runtime.wait(works, what)

    def _fail(self, error: BaseException, what: str) -> None:
        """Post the error, then tell every waiting peer through a failure header."""
        runtime = self.runtime
        runtime.report(error)
        header = torch.tensor([FAILED, 0, 0, 0, 0, 0, 0], dtype=torch.int64)
        works = [runtime.isend(header, r) for r in self.peers]
        # The peers also read the board; the original error is what this rank raises.
        with contextlib.suppress(HostOwnerError):
            runtime.wait(works, what)


class RemoteLayer:
    """A non-owner's experts layer: no weights; every call runs on the host's owner."""

    owns_experts = False

    def __init__(self, backend: str, top_k: int, runtime: HostOwnerRuntime, label: str) -> None:
        self.backend = backend
        self.top_k = top_k
        self.runtime = runtime
        self.label = label

    def __deepcopy__(self, memo: dict[int, Any]) -> RemoteLayer:
        return self

    def host_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype  # the owner casts to its layer's dtype and back

    def load_weights(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """Nothing to keep: the owner holds this layer's weights."""

    def load_quantized(self, *tensors: torch.Tensor) -> None:
        """Nothing to keep: the owner holds this layer's weights."""

    def forward(
        self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, lora: ExpertLoRA | None, save: bool
    ) -> tuple[torch.Tensor, RemoteHandle | None]:
        runtime = self.runtime
        owner = runtime.layout.owner
        what = f"{self.label} forward on rank {runtime.layout.rank} (owner rank {owner})"
        fields = [OK, x.shape[0], _code(x.dtype), _code(ids.dtype), _code(weights.dtype), int(save)]
        (out,) = self._exchange(fields, [x, ids, weights], [((x.shape[0], x.shape[1]), x.dtype)], what)
        return out, (RemoteHandle(x.shape[0], x.dtype, weights.dtype) if save else None)

    def backward(self, handle: RemoteHandle, grad_out: torch.Tensor) -> ExpertGrads:
        if not isinstance(handle, RemoteHandle) or handle.consumed:
            raise RuntimeError("handle must come from one RemoteLayer.forward(save=True), used once")
        handle.consumed = True
        runtime = self.runtime
        what = f"{self.label} backward on rank {runtime.layout.rank} (owner rank {runtime.layout.owner})"
        fields = [OK, handle.tokens, _code(grad_out.dtype), 0, 0, 1]
        tokens, hidden = grad_out.shape
        gx, gw = self._exchange(
            fields,
            [grad_out],
            [((tokens, hidden), handle.x_dtype), ((tokens, self.top_k), handle.weights_dtype)],
            what,
        )
        return ExpertGrads(grad_x=gx, grad_weights=gw, lora=(None, None, None, None))

    def _exchange(
        self,
        fields: Sequence[int],
        parts: Sequence[torch.Tensor],
        reply_specs: Sequence[tuple[tuple[int, ...], torch.dtype]],
        what: str,
    ) -> list[torch.Tensor]:
        runtime = self.runtime
        owner = runtime.layout.owner
        sends, keep = runtime.send_message(fields, parts, owner)
        reply = torch.empty(HEADER_LEN, dtype=torch.int64)
        runtime.wait([*sends, runtime.irecv(reply, owner)], what)
        del keep
        if int(reply[0]) != OK:
            runtime.raise_failure(what, f"the owner (rank {owner}) failed")
        data, receiving = runtime.receive_payload(owner, int(reply[6]))
        runtime.wait(receiving, what)
        return [t.clone() for t in _unpack(data, reply_specs)]


def host_owner_layer(kt: KTConfig, build_inner: Callable[[], Any], top_k: int, label: str) -> Any:
    """The experts layer of this rank in a host-owner run: the owner's wrapper or a remote proxy."""
    runtime = runtime_for(kt)
    if runtime.layout.is_owner:
        return OwnerLayer(build_inner(), runtime, label or "KTExperts")
    return RemoteLayer(kt.backend, top_k, runtime, label or "KTExperts")


# -- model-level helpers: parameters, DDP, gradients, saving ------------------------------------------------


def _host_owner_layer(module: nn.Module) -> OwnerLayer | RemoteLayer | None:
    """The host-owner layer of a KTExperts (under proxies such as timing's), else None.

    Found by its layer, so this module needs no import of experts.py."""
    layer = getattr(module, "layer", None)
    while layer is not None and not isinstance(layer, (OwnerLayer, RemoteLayer)):
        layer = getattr(layer, "inner", None)
    return layer


def is_host_owner_experts(module: nn.Module) -> bool:
    return _host_owner_layer(module) is not None


def _wrapsis_host_owner_experts(module: nn.Module) -> bool:
    """True for a PEFT wrapper (one with lora_A) whose chain of base layers ends at host-owner experts."""
    if not hasattr(module, "lora_A"):
        return False
    base = getattr(module, "base_layer", None)
    while base is not None and not is_host_owner_experts(base):
        base = getattr(base, "base_layer", None)
    return base is not None


def expert_lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The expert-LoRA parameters (PEFT wrappers around host-owner KTExperts), by qualified name."""
    wrappers = {name for name, module in model.named_modules() if _wrapsis_host_owner_experts(module)}
    found: dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        parts = name.split(".")  # <wrapper>.lora_A.<adapter>.weight
        if len(parts) > 3 and parts[-3] in ("lora_A", "lora_B") and ".".join(parts[:-3]) in wrappers:
            found[name] = param
    return found


def _kt_experts_names(model: nn.Module) -> list[str]:
    return [
        f"{name}.{p}"
        for name, module in model.named_modules()
        if is_host_owner_experts(module)
        for p in ("gate_up_proj", "down_proj")
    ]


def prepare_model(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    """Ready a PEFT model of a host-owner run for DDP; returns the names DDP must ignore.

    On non-owners the expert-LoRA parameters become zero-storage frozen placeholders and leave
    `optimizer`; on every rank DDP is told to ignore them and the experts' placeholders (the owner
    averages and syncs them, see sync_expert_grads). Call it before DistributedDataParallel /
    accelerator.prepare and before the first step.
    """
    runtime = _runtime_of(model)
    lora = expert_lora_parameters(model)
    if not lora:
        raise ValueError(
            "prepare_model: the model has no expert LoRA (get_peft_model with kt_lora_config first)"
        )
    dropped: set[int] = set()
    if not runtime.layout.is_owner:
        for name, param in lora.items():
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            dropped.add(id(param))
            placeholder = torch.zeros((), dtype=param.dtype).expand(param.shape)
            setattr(module, attr, nn.Parameter(placeholder, requires_grad=False))
    if optimizer is not None and dropped:
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in dropped]
    ignored = sorted(set(lora) | set(_kt_experts_names(model)))
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    return ignored


def ignored_modules(model: nn.Module, ignored: Sequence[str]) -> list[nn.Module]:
    """The modules that hold exactly the parameters named in `ignored` (prepare_model's list).

    For FSDP2's `ignored_params` through accelerate's `ignored_modules`: the LoRA factor modules of the
    expert wrappers and the KTExperts (whose own parameters are the zero-storage placeholders).
    """
    modules = {name.rpartition(".")[0] for name in ignored}
    found = [model.get_submodule(name) for name in sorted(modules)]
    held = {id(p) for m in found for p in m.parameters()}
    names = set(ignored)
    wanted = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name in names}
    if held != wanted:  # a module with other parameters would take them out of FSDP too
        raise RuntimeError(
            "the expert LoRA and experts placeholders do not sit in modules of their own; cannot exclude "
            "them from FSDP2 by module"
        )
    return found


def _runtime_of(model: nn.Module) -> HostOwnerRuntime:
    layers = [layer for m in model.modules() if (layer := _host_owner_layer(m)) is not None]
    if not layers:
        raise ValueError(
            "the model's experts are not host-owner experts: load or wrap it with "
            "KTConfig(distributed='host_owner') after init_process_group"
        )
    return layers[0].runtime


def _owner_expert_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in expert_lora_parameters(model).values() if p.requires_grad]


def sync_expert_grads(model: nn.Module) -> None:
    """Sum the owners' expert-LoRA grads across hosts (once per backward; a no-op on one host)."""
    runtime = _runtime_of(model)
    if not runtime.layout.is_owner or not runtime.expert_grads_pending:
        return
    runtime.expert_grads_pending = False
    if len(runtime.layout.hosts) == 1:
        return
    params = _owner_expert_params(model)
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for param in params:
        by_dtype.setdefault(param.grad.dtype, []).append(param)  # type: ignore[union-attr]
    for dtype in sorted(by_dtype, key=str):
        group = by_dtype[dtype]
        flat = torch.cat([p.grad.reshape(-1) for p in group])  # type: ignore[union-attr]
        what = "expert-LoRA gradient all-reduce over the hosts' owners"
        work = runtime.post(what, dist.all_reduce, flat, group=runtime.owners_group, async_op=True)
        runtime.wait([work], what)
        offset = 0
        for p in group:
            n = p.grad.numel()  # type: ignore[union-attr]
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))  # type: ignore[union-attr]
            offset += n


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over the whole run's gradient (dense under DDP + owners' expert LoRA).

    Every rank gets the same norm and the same clip coefficient. Syncs the expert grads first.
    """
    runtime = _runtime_of(model)
    sync_expert_grads(model)
    expert_ids = {id(p) for p in expert_lora_parameters(model).values()}
    dense = [p for p in model.parameters() if p.grad is not None and id(p) not in expert_ids]
    experts = (
        [p for p in _owner_expert_params(model) if p.grad is not None] if runtime.layout.is_owner else []
    )
    dense_sq = _dense_squared_norm(runtime, [p.grad for p in dense])  # type: ignore[misc]
    expert_sq = sum(
        (p.grad.detach().double().pow(2).sum() for p in experts), torch.zeros((), dtype=torch.float64)
    )  # type: ignore[union-attr]
    expert_sq = expert_sq.reshape(1).clone()
    if len(runtime.layout.members) > 1:
        what = "expert-LoRA gradient norm from the owner"
        owner, host = runtime.layout.owner, runtime.host_group
        work = runtime.post(what, dist.broadcast, expert_sq, src=owner, group=host, async_op=True)
        runtime.wait([work], what)
    total = (dense_sq.cpu() + expert_sq[0]).sqrt()
    coefficient = min(1.0, float(max_norm) / (float(total) + 1e-6))
    if coefficient < 1.0:
        for p in dense + experts:
            p.grad.detach().mul_(coefficient)  # type: ignore[union-attr]
    return total.float()


def _dense_squared_norm(runtime: HostOwnerRuntime, grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Squared norm of the dense gradient: replicated grads (DDP) as they are, FSDP2's sharded grads
    (DTensors) summed over their shards with one all-reduce."""
    from torch.distributed.tensor import DTensor

    replicated = torch.zeros((), dtype=torch.float64)
    sharded = torch.zeros(1, dtype=torch.float64)
    any_sharded = False
    for grad in grads:
        if isinstance(grad, DTensor):
            any_sharded = True
            sharded += grad.to_local().detach().double().pow(2).sum().cpu()
        else:
            replicated += grad.detach().double().pow(2).sum().cpu()
    if any_sharded:
        what = "dense gradient norm of the FSDP2 shards"
        work = runtime.post(what, dist.all_reduce, sharded, group=runtime.control_group, async_op=True)
        runtime.wait([work], what)
    return replicated + sharded[0]


def full_state_dict(model: nn.Module, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """`model.state_dict()` entries whose name passes `keep`, FSDP2 shards gathered (every rank calls it)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, tensor in model.state_dict().items():
        if keep(name):
            out[name] = tensor.full_tensor().cpu() if isinstance(tensor, DTensor) else tensor
    return out


def install_step_sync(model: nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    """Make `optimizer.step()` sync the expert grads across hosts first (a torch step pre-hook)."""
    return optimizer.register_step_pre_hook(lambda *_: sync_expert_grads(model))


def save_adapter(model: nn.Module, path: str | os.PathLike[str], **kwargs: Any) -> None:
    """`save_pretrained` of the PEFT model on the adapter writer only (the first host's owner); all wait."""
    runtime = _runtime_of(model)
    peft_model = getattr(model, "module", model)
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in peft_model.parameters()) and "state_dict" not in kwargs:
        # FSDP2 shards the dense LoRA: gather the adapter's tensors (a collective on every rank).
        kwargs["state_dict"] = full_state_dict(peft_model, lambda name: "lora_" in name)
    error: BaseException | None = None
    if runtime.layout.is_adapter_writer:
        try:
            peft_model.save_pretrained(path, **kwargs)
        except BaseException as caught:
            runtime.report(caught)
            error = caught
    if error is not None:
        raise error
    runtime.wait([dist.barrier(async_op=True, group=runtime.control_group)], f"saving the adapter to {path}")


def monitor_ddp(ddp_model: nn.parallel.DistributedDataParallel) -> None:
    """Make DDP's gradient all-reduce wait like the experts exchange (error board + timeout).

    Without it a failure on another host surfaces in DDP's all-reduce only after the process group's
    timeout, with torch's message; with it every rank raises the failing rank's message. The hook
    waits for each bucket before the backward goes on, so it gives up DDP's overlap of communication
    with the backward: worth it on gloo/CPU and for debugging, a choice on NCCL.
    """
    runtime = _runtime_of(ddp_model.module)
    world = dist.get_world_size()

    # DDP inspects the hook's annotations: `bucket` must be unannotated or dist.GradBucket at run time.
    def hook(state, bucket):  # type: ignore[no-untyped-def]
        tensor = bucket.buffer()
        what = "the dense gradient all-reduce (DDP)"
        runtime.wait([runtime.post(what, dist.all_reduce, tensor, async_op=True)], what)
        tensor.div_(world)
        future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        future.set_result(tensor)
        return future

    ddp_model.register_comm_hook(None, hook)
