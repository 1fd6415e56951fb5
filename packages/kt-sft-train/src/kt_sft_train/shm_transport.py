"""Shared-memory mailboxes for the host-owner exchange (ranks of one host share RAM; ADR 0801).

One one-way byte channel per (sender, receiver) pair of a host, in a file under /dev/shm that both map.
The gloo header message that the exchange sends anyway is the doorbell: the sender writes the payload into
its segment, then sends the header; the receiver, once it has the header, reads the payload in place. The
exchange is lock-step (a request, then its reply), so a segment is never rewritten before its reader is
done with it.

Segments grow: the capacity is the next power of two of the largest payload so far (at least 1 MiB), and
both sides derive it from the payload sizes they exchanged, so the header needs no extra field. A segment
file is unlinked by its reader as soon as it has mapped it (and by its writer on close if no reader came),
so a crash after that leaves nothing in /dev/shm; only a crash between the writer's create and the
reader's open can leave a file (named kt-sft-<run>-<src>-<dst>-<capacity>).
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Sequence
from pathlib import Path

import torch

MIN_CAPACITY = 1 << 20


def capacity_for(nbytes: int, current: int) -> int:
    """The segment capacity after a payload of `nbytes`, given the capacity so far."""
    needed = max(nbytes, MIN_CAPACITY)
    capacity = max(current, MIN_CAPACITY)
    while capacity < needed:
        capacity *= 2
    return capacity


class _Segment:
    def __init__(self, path: Path, capacity: int, create: bool) -> None:
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                # Reserve the pages now: a full tmpfs (Docker's default /dev/shm is 64 MiB) then fails
                # here with a message instead of killing the process with SIGBUS at the first write.
                try:
                    os.posix_fallocate(fd, 0, capacity)
                except OSError as error:
                    path.unlink()
                    raise RuntimeError(
                        f"host-owner exchange: cannot reserve {capacity >> 20} MiB in {path.parent} for a "
                        f"shared-memory mailbox ({error.strerror}); enlarge it (docker --shm-size) or use "
                        "KTConfig(exchange_transport='gloo')"
                    ) from None
            self.map = mmap.mmap(fd, capacity)
        finally:
            os.close(fd)
        self.path = path
        self.capacity = capacity
        self.bytes = torch.frombuffer(self.map, dtype=torch.uint8)

    def close(self) -> None:
        del self.bytes
        with contextlib.suppress(BufferError):  # a caller still holds a view: the mapping ends with it
            self.map.close()


class ShmMailboxes:
    """This rank's mailboxes to and from the other ranks of its host, for one run (`run_id`)."""

    def __init__(self, run_id: str, rank: int, directory: str | os.PathLike[str] = "/dev/shm") -> None:
        self.run_id = run_id
        self.rank = rank
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise RuntimeError(
                f"host-owner exchange: no {self.directory} for shared-memory mailboxes on this machine; use "
                "KTConfig(exchange_transport='gloo')"
            )
        self._outboxes: dict[int, _Segment] = {}
        self._inboxes: dict[int, _Segment] = {}
        self._unclaimed: set[Path] = set()

    def _path(self, src: int, dst: int, capacity: int) -> Path:
        return self.directory / f"kt-sft-{self.run_id}-{src}-{dst}-{capacity}"

    def write(self, dst: int, parts: Sequence[torch.Tensor]) -> int:
        """Copy `parts` (their bytes, back to back) into the mailbox to `dst`; returns the byte count.

        Send the header after this returns: it tells `dst` the payload is there."""
        sizes = [t.numel() * t.element_size() for t in parts]
        nbytes = sum(sizes)
        segment = self._outboxes.get(dst)
        capacity = capacity_for(nbytes, segment.capacity if segment else 0)
        if segment is None or segment.capacity != capacity:
            path = self._path(self.rank, dst, capacity)
            new = _Segment(path, capacity, create=True)
            self._unclaimed.add(path)
            if segment is not None:
                self._forget(segment)
                segment.close()
            self._outboxes[dst] = segment = new
        offset = 0
        for t, size in zip(parts, sizes, strict=True):
            if size:
                segment.bytes[offset : offset + size].copy_(t.contiguous().view(torch.uint8).reshape(-1))
            offset += size
        return nbytes

    def read(self, src: int, nbytes: int) -> torch.Tensor:
        """The `nbytes` payload from `src` (after its header arrived), as a view valid until its next one."""
        segment = self._inboxes.get(src)
        capacity = capacity_for(nbytes, segment.capacity if segment else 0)
        if segment is None or segment.capacity != capacity:
            path = self._path(src, self.rank, capacity)
            new = _Segment(path, capacity, create=False)
            path.unlink()  # both sides have it mapped: nothing is left behind from now on
            if segment is not None:
                segment.close()
            self._inboxes[src] = segment = new
        return segment.bytes[:nbytes]

    def _forget(self, segment: _Segment) -> None:
        if segment.path in self._unclaimed:
            self._unclaimed.discard(segment.path)
            with contextlib.suppress(FileNotFoundError):
                segment.path.unlink()

    def close(self) -> None:
        """Unmap everything; unlink the files no reader has claimed yet."""
        for segment in [*self._outboxes.values(), *self._inboxes.values()]:
            self._forget(segment)
            segment.close()
        for path in self._unclaimed:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._outboxes.clear()
        self._inboxes.clear()
        self._unclaimed.clear()
