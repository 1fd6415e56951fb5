"""The quantized-experts cache (ADR 0604): the int8 / int4 expert bases that loading a bf16 or fp8
checkpoint quantizes, kept on disk so that a restart reads them back instead of quantizing again.

Layout: ``<cache>/<checkpoint folder name>-<digest of its absolute path>/<experts module>.<base>.safetensors``
with ``<base>`` = ``int8`` or ``int4-g<group>``. Each file holds one experts module in the kernels' own
storage (kt_sft_train.quantization: ``gate_up_q``, ``gate_up_scale``, ``down_q``, ``down_scale``),
which ``load_quantized`` takes back bit-exactly, and in its metadata the key it was made for: the cache
format, the base, the kernels' version (their quantization rule) and the fingerprint of the layer's
source tensors (key, dtype, shape; the file's size and modification time). A file whose key differs
from the checkpoint as it is now is stale: the layer is quantized again and the file replaced.

Files are written under a temporary name and renamed, so a crash never leaves a partial file under the
real name. A file that cannot be written (disk full, no permission) or read (damaged) costs a warning
and a quantization, never the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ._kernels import kernels_version
from .config import KTConfig, KTConfigError
from .quantization import effective_group_size, storage_layout
from .weights import ExpertLayerPlan, ExpertParamPlan, TensorInfo

logger = logging.getLogger(__name__)

CACHE_FORMAT = "kt-sft quantized experts 1"
_METADATA_KEY = "kt_sft_quantized_experts"
_TENSOR_NAMES = ("gate_up_q", "gate_up_scale", "down_q", "down_scale")
# Where load_kt_model leaves the QuantizedCacheReport of the load on the model (quantized_cache_report).
QUANTIZED_CACHE_ATTR = "_kt_quantized_cache"


class QuantizedCacheError(KTConfigError):
    """KTConfig.quantized_cache names a directory that cannot be created."""


@dataclass
class QuantizedCacheReport:
    """What one load did with the cache: layers read back, quantized and written, and why others were not."""

    directory: Path
    read: int = 0
    written: int = 0
    replaced: list[str] = field(default_factory=list)  # stale or damaged files, rewritten
    not_written: list[str] = field(default_factory=list)  # write failures (warned)

    def summary(self) -> str:
        parts = [f"{self.read} layer(s) read back", f"{self.written} quantized and written"]
        if self.replaced:
            parts.append(f"{len(self.replaced)} stale or damaged file(s) replaced")
        if self.not_written:
            parts.append(f"{len(self.not_written)} could not be written (see the warnings)")
        return f"{', '.join(parts)} ({self.directory})"


class QuantizedExpertCache:
    """The cache of one checkpoint's quantized experts for one KTConfig (its weight_dtype and group_size)."""

    def __init__(
        self, root: str | os.PathLike[str], checkpoint_dir: Path, kt: KTConfig, fp8_block: tuple[int, int]
    ):
        if kt.weight_dtype not in ("int8", "int4"):
            raise ValueError(f"the quantized-experts cache holds int8 / int4 bases, not {kt.weight_dtype!r}")
        source = checkpoint_dir.resolve()
        digest = hashlib.sha256(str(source).encode()).hexdigest()[:16]
        self.directory = Path(root).expanduser().resolve() / f"{source.name}-{digest}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise QuantizedCacheError(
                f"KTConfig.quantized_cache: cannot create {str(self.directory)!r}: {error.strerror or error}"
            ) from None
        self.kt = kt
        self.fp8_block = fp8_block
        self.report = QuantizedCacheReport(self.directory)

    def _group(self, plan: ExpertLayerPlan) -> int | None:
        """The int4 group size of the layer (None for int8)."""
        if self.kt.weight_dtype == "int8":
            return None
        _, two_i, hidden = plan.gate_up.shape
        return effective_group_size(self.kt.group_size, hidden, two_i // 2)

    def path(self, plan: ExpertLayerPlan) -> Path:
        group = self._group(plan)
        base = "int8" if group is None else f"int4-g{group}"
        return self.directory / f"{plan.module_name}.{base}.safetensors"

    def key(self, plan: ExpertLayerPlan) -> str:
        """What a file must have been made from to be read back for `plan` (JSON, compared as a whole)."""
        sources = sorted({_fingerprint(info) for info in _source_tensors(plan)})
        return json.dumps(
            {
                "format": CACHE_FORMAT,
                "weight_dtype": self.kt.weight_dtype,
                "group_size": self._group(plan),
                "fp8_block": list(self.fp8_block),
                "kernels": kernels_version(),
                "module": plan.module_name,
                "sources": hashlib.sha256(json.dumps(sources).encode()).hexdigest(),
            },
            sort_keys=True,
        )

    def read(self, plan: ExpertLayerPlan) -> tuple[torch.Tensor, ...] | None:
        """The layer's quantized storage from its file, or None (no file, a stale or a damaged one)."""
        path = self.path(plan)
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt", device="cpu") as handle:
                if (handle.metadata() or {}).get(_METADATA_KEY) != self.key(plan):
                    self.report.replaced.append(path.name)
                    logger.info("quantized cache: %s is stale (the checkpoint or the settings changed)", path)
                    return None
                tensors = tuple(handle.get_tensor(name) for name in _TENSOR_NAMES)
            problem = self._problem(plan, tensors)
        except Exception as error:  # safetensors raises its own error types for damaged files
            problem = str(error)
        if problem:
            self.report.replaced.append(path.name)
            logger.warning("quantized cache: cannot read %s (%s); quantizing this layer again", path, problem)
            return None
        self.report.read += 1
        return tensors

    def _problem(self, plan: ExpertLayerPlan, tensors: tuple[torch.Tensor, ...]) -> str | None:
        """What is wrong with a file's tensors for `plan` (None: nothing), before the kernels see them."""
        experts, two_i, hidden = plan.gate_up.shape
        expected = storage_layout(self.kt.weight_dtype, experts, hidden, two_i // 2, self._group(plan))
        for name, tensor, (shape, dtype) in zip(_TENSOR_NAMES, tensors, expected, strict=True):
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                return f"{name} is {tensor.dtype} {list(tensor.shape)}, expected {dtype} {list(shape)}"
            if dtype == torch.float32 and not bool(torch.isfinite(tensor).all()):
                return f"{name} holds a non-finite scale"
        return None

    def write(self, plan: ExpertLayerPlan, storage: tuple[torch.Tensor, ...]) -> None:
        """Write the layer's quantized storage (atomically: a temporary file renamed over the real name)."""
        path = self.path(plan)
        temporary = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
        try:
            tensors = dict(zip(_TENSOR_NAMES, storage, strict=True))
            save_file(tensors, temporary, metadata={_METADATA_KEY: self.key(plan)})
            os.replace(temporary, path)
        except (OSError, SafetensorError) as error:
            self.report.not_written.append(path.name)
            logger.warning(
                "quantized cache: cannot write %s (%s); training goes on, the next load quantizes "
                "this layer again",
                path,
                getattr(error, "strerror", None) or error,
            )
            return
        finally:  # a failed or interrupted write leaves nothing behind
            temporary.unlink(missing_ok=True)
        self.report.written += 1


def quantized_cache_report(model: torch.nn.Module) -> QuantizedCacheReport | None:
    """What loading `model` did with KTConfig.quantized_cache (None: no cache was used)."""
    return model.__dict__.get(QUANTIZED_CACHE_ATTR)


def _source_tensors(plan: ExpertLayerPlan) -> Iterator[TensorInfo]:
    params: tuple[ExpertParamPlan, ...] = (plan.gate_up, plan.down)
    for param in params:
        for info in (param.fused, param.fused_scale):
            if info is not None:
                yield info
        for piece in param.slices:
            yield piece.tensor
            if piece.scale is not None:
                yield piece.scale


def _fingerprint(info: TensorInfo) -> tuple[Any, ...]:
    stat = info.file.stat()
    return (info.key, str(info.dtype), tuple(info.shape), info.file.name, stat.st_size, stat.st_mtime_ns)
