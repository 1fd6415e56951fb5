"""Native core of kt_sft_kernels (use the package, not this module). Hand-kept in sync with
src/bindings/*.cpp; tests/test_import.py checks that the names match."""

from collections.abc import Sequence
from types import ModuleType
from typing import Any, TypeAlias

# A NumPy array, torch tensor, or any DLPack / buffer-protocol array on the CPU, C-contiguous.
# bf16: torch.bfloat16, an ml_dtypes.bfloat16 NumPy array, or uint16 holding the bf16 bits.
Array: TypeAlias = Any

_testing: ModuleType

def isa_names() -> list[str]:
    """All tier names, lowest first."""

def active_isa() -> str:
    """The tier the next kernel call uses: min(best supported, cap)."""

def best_isa() -> str:
    """The highest tier this build and CPU support."""

def isa_supported(name: str) -> bool:
    """
    Whether the tier is compiled into this build and this CPU/OS can run it.
    """

def isa_compiled(name: str) -> bool:
    """Whether the tier's code is in this build."""

def set_max_isa(name: str | None) -> str:
    """
    Cap the tier (None: no cap); returns the tier now active. A cap above what this build and CPU support
    runs the best available and warns (RuntimeWarning).
    """

def isa_cap() -> str | None:
    """The cap in force, or None."""

def isa_cap_source() -> str:
    """Where the cap came from: 'none', 'KT_SFT_MAX_ISA' or 'set_max_isa'."""

def kernel_variant_names() -> list[str]:
    """Kernel variants of the avx512_bf16 tier."""

def kernel_variant() -> str:
    """The variant the avx512_bf16 tier's next kernel call uses ('fma' or 'bf16dot')."""

def set_kernel_variant(name: str | None) -> str:
    """
    Force the avx512_bf16 tier's kernel variant (None: back to the automatic choice); returns the variant
    now active.
    """

def kernel_variant_source() -> str:
    """Where the variant came from: 'cpu table', 'probe', 'KT_SFT_KERNEL_VARIANT' or 'set_kernel_variant'."""

def kernel_variant_reason() -> str:
    """Why the automatic choice is what it is."""

def auto_kernel_variant() -> str:
    """The automatic choice (CPU table, or probe for CPUs it does not know), whatever is forced."""

def bf16dot_probe_ratio() -> float | None:
    """VDPBF16PS FLOP rate over VFMADD231PS FLOP rate on this core, measured once (None: tier cannot run)."""

def cpu_model() -> dict[str, int]:
    """CPUID family, model and stepping (as /proc/cpuinfo shows them; 0 off x86)."""

def cpu_features() -> dict[str, bool | str]:
    """What CPUID/XGETBV report, and the AMX permission."""

def cpu_feature_names() -> tuple[list[str], list[str]]:
    """(CPU feature flags, OS state flags): the boolean keys of cpu_features(), for reports."""

def build_info() -> dict[str, Any]:
    """Version, compiler, build type and the compiled tiers with their flags."""

def physical_cores() -> int:
    """
    Physical cores among the CPUs this process may run on (sched_getaffinity).
    """

def affinity_cpus() -> list[int]:
    """Logical CPUs in this process's affinity mask."""

def default_thread_count(logical_cpus: int | None = None, physical_cores: int | None = None) -> int:
    """
    Threads of a pool nobody sized (ADR 0901): the logical CPUs of the affinity mask, or one per physical
    core on an SMT machine with >= 4 cores. With arguments: the rule for those counts.
    """

def default_thread_reason() -> str:
    """The default thread count and which branch of the rule gave it, for reports."""

class ThreadPool:
    """
    A pool of worker threads; the thread making a call works too. Calls on one pool run one at a time, in
    the order they were made.
    """

    def __init__(
        self, threads: int = 0, pin: bool = False, cpus: Sequence[int] | None = None, node: int | None = None
    ) -> None:
        """
        threads: total threads including the caller; 0 = default_thread_count(). pin:
        bind each worker to its own physical core. cpus: a pool of one thread per listed CPU, each pinned
        to its CPU (the pool's calling thread to the first). node: cpus = that NUMA node's physical cores
        (kt_sft_kernels.topology()).
        """

    @property
    def threads(self) -> int: ...
    @property
    def pinned(self) -> bool: ...
    @property
    def is_default(self) -> bool: ...
    @property
    def cpus(self) -> list[int]:
        """The CPU each thread is pinned to (index 0 = the calling thread); [] when unpinned."""

    def cpu_affinity(self) -> list[list[int]]:
        """Each thread's affinity mask as the OS reports it: [calling thread, worker 1, ...]."""

    def __eq__(self, arg: object, /) -> bool: ...
    def __hash__(self) -> int: ...
    def __repr__(self) -> str: ...

def estimate_layer_bytes(config: MoEConfig, tokens: int = 0, lora_rank: int = 0) -> dict[str, int]:
    """
    Host bytes of one layer of `config`: weights and scales (exact: what memory_report shows once loaded),
    cache (the activation cache of a forward(save=True) on `tokens` tokens, LoRA rank `lora_rank` on both
    projections), total. The pool's shared workspace is not included.
    """

def topology(root: str | None = None, affinity: Sequence[int] | None = None) -> dict[str, Any]:
    """
    NUMA nodes with the CPUs and physical cores this process may use (affinity mask, cgroup CPU limit).
    root/affinity: read another /sys tree or cut to another mask (tests); default: this process, read once.
    """

def shard_layout(
    shards: int | None = None,
    numa: str | None = None,
    root: str | None = None,
    affinity: Sequence[int] | None = None,
) -> list[dict[str, list[int]]]:
    """
    The shards a layer with numa_shards=shards would use: a list of {nodes, cpus} (one thread per CPU).
    shards=None: the count KT_SFT_NUMA asks for ('auto' = one per node). numa: a KT_SFT_NUMA value to
    use instead of the environment's.
    """

def shards_run_in_turn(
    shards: int | None = None,
    numa: str | None = None,
    root: str | None = None,
    affinity: Sequence[int] | None = None,
) -> bool:
    """
    Whether the shards of that layout run as one call on all their CPUs (all on the same nodes, unless
    KT_SFT_NUMA_SHARED_DOWN=0), rather than at once on pinned sub-pools (ADR 0701).
    """

def format_cpu_list(cpus: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""

def default_pool() -> ThreadPool:
    """
    The process-wide pool (KT_SFT_NUM_THREADS, else default_thread_count() threads), created at first use.
    """

class MoEConfig:
    """
    Shape and storage of one MoE layer's routed experts. weight_dtype: "bf16", or a frozen quantized
    base, "int8" (per output row, fp32 scales) or "int4" (groups of group_size along the reduction
    dimension, fp32 scales; hidden and intermediate must be multiples of group_size). group_size is
    32, 64 or 128 (ValueError otherwise; only int4 uses it). docs/kernels.md, "Quantized bases".
    """

    def __init__(
        self,
        *,
        num_experts: int,
        top_k: int,
        hidden: int,
        intermediate: int,
        weight_dtype: str = "bf16",
        group_size: int = 128,
        numa_shards: int = 1,
    ) -> None: ...
    @property
    def num_experts(self) -> int: ...
    @property
    def top_k(self) -> int: ...
    @property
    def hidden(self) -> int: ...
    @property
    def intermediate(self) -> int: ...
    @property
    def weight_dtype(self) -> str: ...
    @property
    def group_size(self) -> int: ...
    @property
    def numa_shards(self) -> int: ...
    def __eq__(self, arg: object, /) -> bool: ...
    def __repr__(self) -> str: ...

class LoRA:
    """
    LoRA weights of one layer's experts, read from caller memory on every call: a_gu [E,r,H], b_gu
    [E,2I,r], a_d [E,r,I], b_d [E,H,r], all float32 or all bfloat16. A projection's pair may be None (no
    LoRA on it). Bump `version` after each optimizer step.
    """

    def __init__(
        self,
        a_gu: Array | None,
        b_gu: Array | None,
        a_d: Array | None,
        b_d: Array | None,
        scale_gu: float | None = None,
        scale_d: float | None = None,
        *,
        version: int = 0,
    ) -> None: ...
    @property
    def a_gu(self) -> Array | None: ...
    @property
    def b_gu(self) -> Array | None: ...
    @property
    def a_d(self) -> Array | None: ...
    @property
    def b_d(self) -> Array | None: ...
    @property
    def scale_gu(self) -> float: ...
    @property
    def scale_d(self) -> float: ...
    @property
    def version(self) -> int:
        """Caller-bumped counter; tiers that cache derived copies key them on it."""

    @version.setter
    def version(self, arg: int, /) -> None: ...
    @property
    def rank_gate_up(self) -> int:
        """r of the gate_up pair (0: no LoRA there)."""

    @property
    def rank_down(self) -> int:
        """r of the down pair (0: no LoRA there)."""

    @property
    def dtype(self) -> str: ...
    def __repr__(self) -> str: ...

class LoRAGrads:
    """
    Output arrays for the LoRA gradients (same shapes and dtype as the LoRA weights; None where the
    forward's LoRA has no pair). Written, never accumulated.
    """

    def __init__(
        self,
        da_gu: Array | None = None,
        db_gu: Array | None = None,
        da_d: Array | None = None,
        db_d: Array | None = None,
    ) -> None: ...
    @property
    def da_gu(self) -> Array | None: ...
    @property
    def db_gu(self) -> Array | None: ...
    @property
    def da_d(self) -> Array | None: ...
    @property
    def db_d(self) -> Array | None: ...

class ForwardHandle:
    """
    What forward(save=True) keeps for backward: owns the activation cache and keeps the layer, x and the
    LoRA arrays alive. Consumed by backward; dropping it frees the cache.
    """

    @property
    def tokens(self) -> int: ...
    @property
    def consumed(self) -> bool: ...
    @property
    def has_lora(self) -> bool: ...
    @property
    def cache_bytes(self) -> int:
        """Host bytes of the activation cache this handle holds (0 once consumed)."""
    def __repr__(self) -> str: ...

class Pending:
    """
    A call in flight on the layer's pool. wait() returns what the sync call returns (or raises its
    exception); dropping it waits.
    """

    def wait(self) -> ForwardHandle | None:
        """Blocks (without the GIL) until the call finished; returns its result."""

    def done(self) -> bool:
        """True once the call finished (never blocks)."""

class MoELayer:
    """One MoE layer's routed experts on the CPU (DESIGN.md §2)."""

    def __init__(self, config: MoEConfig, pool: ThreadPool | None = None) -> None: ...
    @property
    def config(self) -> MoEConfig: ...
    @property
    def pool(self) -> ThreadPool: ...
    @property
    def loaded(self) -> bool: ...
    def load_weights(
        self,
        gate_up: Array | None = None,
        down: Array | None = None,
        *,
        gate: Array | None = None,
        up: Array | None = None,
    ) -> None:
        """
        Packs the weights (gate_up [E,2I,H] or gate/up [E,I,H] each, down [E,H,I]) into the layer's own
        memory; the caller may free its arrays afterwards. bf16 layers take bf16; int8/int4 layers take
        bf16 or float32 and quantize while packing (the one rule of docs/kernels.md: int8 scale =
        max|row|/127, int4 scale = max|group|/8, q = round-half-even(w/scale) clamped to [-127, 127] /
        [-8, 7]).
        """

    def load_quantized(
        self, gate_up_q: Array, gate_up_scale: Array, down_q: Array, down_scale: Array
    ) -> None:
        """
        Loads a pre-quantized base bit-exactly (int8/int4 layers). int8: q int8 [E,N,K], scale [E,N]. int4:
        q uint8 [E,N,K/2] (element k in byte k//2, low nibble = even k, two's complement nibble, so
        [-8, 7]), scale [E,N,K/group_size]. Scales float32 or bfloat16 (converted exactly). gate_up is
        N = 2I, K = H; down is N = H, K = I. The kernels use W = fp32(q * scale).
        """

    def read_quantized(
        self, gate_up_q: Array, gate_up_scale: Array, down_q: Array, down_scale: Array
    ) -> None:
        """Writes the packed quantized base into caller arrays: load_quantized's shapes, float32 scales."""

    def memory_report(self) -> dict[str, Any]:
        """
        Host bytes: weights (packed values), scales, cache_spare (the freed activation cache kept for the
        next forward), total (= the three: the layer's own), workspace_shared (the thread pool's per-call
        scratch, shared by workspace_layers layers: count it once per pool, not per layer). numa_shards > 1:
        these are the shards' sums, and shards lists each shard's own (weights, scales, cache_spare,
        total, workspace_shared; an int8 base: each shard keeps the full-row scales of its down columns,
        H floats a shard and expert, counted by estimate_layer_bytes too).
        """

    def forward(
        self, x: Array, ids: Array, weights: Array, out: Array, lora: LoRA | None = None, save: bool = False
    ) -> ForwardHandle | None:
        """
        out[T,H] = sum_j weights[t,j] * expert_{ids[t,j]}(x[t]). Returns a ForwardHandle if save, else None.
        """

    def forward_async(
        self, x: Array, ids: Array, weights: Array, out: Array, lora: LoRA | None = None, save: bool = False
    ) -> Pending:
        """forward() queued on the layer's pool; returns a Pending."""

    def backward(
        self,
        saved: ForwardHandle,
        grad_out: Array,
        grad_x: Array,
        grad_weights: Array,
        lora_grads: LoRAGrads | None = None,
    ) -> None:
        """
        Writes grad_x [T,H], grad_weights [T,k] and the LoRA gradients; consumes `saved`.
        """

    def backward_async(
        self,
        saved: ForwardHandle,
        grad_out: Array,
        grad_x: Array,
        grad_weights: Array,
        lora_grads: LoRAGrads | None = None,
    ) -> Pending:
        """backward() queued on the layer's pool; returns a Pending."""

    def shard_report(self) -> list[dict[str, Any]]:
        """
        numa_shards > 1: one dict per shard: intermediate slice [i0, i1), nodes, cpus (one pinned thread
        each), weight_bytes (packed base weights it owns), buffer_bytes (fp32 partials of its sub-pool,
        shared by the layers on it), weight_node (NUMA node of its first weight page, -1 unknown). []
        for an unsharded layer.
        """

    def __repr__(self) -> str: ...

class profiler:  # a submodule at runtime; written as a class of static functions here
    """kk.profiler: TSC-timed named stages per thread (see DESIGN.md §3.5)."""

    @staticmethod
    def enable() -> None: ...
    @staticmethod
    def disable() -> None: ...
    @staticmethod
    def reset() -> None: ...
    @staticmethod
    def is_enabled() -> bool: ...
    @staticmethod
    def tsc_hz() -> float: ...
    @staticmethod
    def stage_names() -> list[str]: ...
    @staticmethod
    def ring_events_per_thread() -> int: ...
    @staticmethod
    def stats() -> dict[str, dict[str, float]]: ...
    @staticmethod
    def dump_chrome_trace(path: str) -> int: ...
