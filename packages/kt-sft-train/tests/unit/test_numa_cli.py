"""`kt-sft train --numa-shards` and the NUMA part of `kt-sft info` (ADR 0701)."""

from __future__ import annotations

import json

import pytest
from kt_sft_train.app.cli import build_parser, main
from kt_sft_train.app.options import TrainOptions


@pytest.mark.parametrize(("text", "value"), [("auto", "auto"), ("AUTO", "auto"), ("3", 3)])
def test_numa_shards_flag(text: str, value: int | str) -> None:
    args = build_parser().parse_args(["train", "--numa-shards", text])
    assert args.numa_shards == value
    options = TrainOptions().with_values({"numa_shards": args.numa_shards}, "command line")
    assert options.kt.numa_shards == value


@pytest.mark.parametrize("text", ["0", "-1", "two"])
def test_bad_numa_shards_flag(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--numa-shards", text])
    assert "--numa-shards: expected a positive integer or 'auto'" in capsys.readouterr().err


def test_info_shows_topology_and_shard_layout(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from factory import kernels_or_skip

    kernels_or_skip()
    import kt_sft_kernels as kk

    monkeypatch.setenv("KT_SFT_NUMA", "2")
    assert main(["info", "--json"]) == 0
    kernels = json.loads(capsys.readouterr().out)["kernels"]
    assert kernels["topology"]["nodes"] == kk.topology()["nodes"]
    assert kernels["shard_layout"] == kk.shard_layout() and len(kernels["shard_layout"]) == 2
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "shards       numa_shards='auto' (KT_SFT_NUMA=2): 2 shard(s)" in text
    assert text.count("               shard ") == 2

    monkeypatch.setenv("KT_SFT_NUMA", "x-y")
    assert main(["info"]) == 0
    assert "KT_SFT_NUMA" in capsys.readouterr().out
