"""Shared-memory mailboxes of the host-owner exchange (kt_sft_train.shm_transport), in one process.

The two ends of a channel are two ShmMailboxes objects in a temporary directory; the exchange over real
processes is tested in integration/test_distributed.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kt_sft_train.shm_transport import MIN_CAPACITY, ShmMailboxes, capacity_for


def test_capacity_grows_by_powers_of_two_and_never_shrinks() -> None:
    assert capacity_for(0, 0) == MIN_CAPACITY
    assert capacity_for(MIN_CAPACITY + 1, 0) == 2 * MIN_CAPACITY
    assert capacity_for(10, 8 * MIN_CAPACITY) == 8 * MIN_CAPACITY
    assert capacity_for(5 * MIN_CAPACITY, 2 * MIN_CAPACITY) == 8 * MIN_CAPACITY


def test_messages_both_ways_growing_and_nothing_left_on_disk(tmp_path: Path) -> None:
    owner, peer = ShmMailboxes("t", 0, tmp_path), ShmMailboxes("t", 1, tmp_path)
    generator = torch.Generator().manual_seed(0)
    for rows in (3, 0, 5000, 17, 40000, 2):  # T = 0, growth past 1 MiB and 8 MiB, then small again
        x = torch.randn(rows, 64, generator=generator).bfloat16()
        ids = torch.randint(0, 128, (rows, 8), generator=generator)
        nbytes = peer.write(0, [x, ids])
        assert nbytes == x.numel() * 2 + ids.numel() * 8
        got = owner.read(1, nbytes)
        assert torch.equal(got[: x.numel() * 2].view(torch.bfloat16).reshape(rows, 64), x)
        assert torch.equal(got[x.numel() * 2 :].view(torch.int64).reshape(rows, 8), ids)
        reply = (x.float() * 2).bfloat16()
        peer_view = peer.read(0, owner.write(1, [reply]))
        assert torch.equal(peer_view.view(torch.bfloat16).reshape(rows, 64), reply)
        # The reader unlinks a segment once mapped: no file outlives its first message.
        assert not list(tmp_path.iterdir())
    owner.close()
    peer.close()
    assert not list(tmp_path.iterdir())


def test_close_unlinks_a_segment_no_reader_claimed(tmp_path: Path) -> None:
    writer = ShmMailboxes("t", 1, tmp_path)
    writer.write(0, [torch.ones(4)])
    assert [p.name for p in tmp_path.iterdir()] == [f"kt-sft-t-1-0-{MIN_CAPACITY}"]
    writer.close()
    assert not list(tmp_path.iterdir())


def test_reading_a_message_that_was_never_written_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ShmMailboxes("t", 0, tmp_path).read(1, 16)


def test_a_missing_directory_names_the_gloo_transport(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="exchange_transport='gloo'"):
        ShmMailboxes("t", 0, tmp_path / "absent")


def test_a_full_tmpfs_fails_with_a_message_instead_of_sigbus() -> None:
    """A payload larger than /dev/shm (a tmpfs rejects such a reservation up front, without filling
    anything): a clear error at reservation instead of SIGBUS at the first write, and no file left."""
    import os
    import uuid

    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm here")
    stats = os.statvfs(shm)
    run = uuid.uuid4().hex
    writer = ShmMailboxes(run, 1, shm)
    too_big = torch.zeros(1, dtype=torch.uint8).expand(2 * stats.f_blocks * stats.f_frsize)
    with pytest.raises(RuntimeError, match=r"cannot reserve .* MiB.*exchange_transport='gloo'"):
        writer.write(0, [too_big])
    assert not list(shm.glob(f"kt-sft-{run}-*"))
