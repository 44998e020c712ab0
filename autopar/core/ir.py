"""The analysed graph (IR): what every later stage (cost, solve, lower, report) reads.

``autopar.trace`` builds an :class:`OpGraph` from an ``nn.Module``: one :class:`OpNode` per fx node
of the model-with-loss graph, in topological order, with shapes, FLOPs, bytes, parameter and saved
activation bytes, module path, source location and the repeated block it belongs to.

Units are in the field names: ``*_bytes`` are bytes, ``flops_*`` are floating-point operations
(a multiply-add counts 2).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import networkx as nx

# Op kinds the cost model and the sharding rules understand. Everything else is "other".
OP_KINDS = (
    "placeholder",  # graph input
    "output",  # graph output
    "param",  # get_attr of a parameter or buffer
    "linear",  # x @ W^T (+ b), nn.Linear / F.linear / aten.linear / addmm
    "matmul",  # activation @ activation (attention scores, probs @ v), bmm, mm
    "attention",  # fused scaled_dot_product_attention
    "embedding",
    "norm",  # layer_norm, rms_norm (or its decomposition root)
    "softmax",
    "dropout",
    "elementwise",  # add, mul, gelu, silu, ... (one output element per input element)
    "view",  # view, reshape, transpose, permute, split, chunk, getitem, contiguous, expand
    "reduction",  # sum, mean, max over a dim
    "loss",  # cross_entropy and friends
    "moe",  # a whole mixture-of-experts layer (router, experts, combine), kept as one leaf region
    "other",
)


@dataclass(kw_only=True)
class OpNode:
    """One node of the analysed graph."""

    name: str
    """The fx node name (unique in the graph)."""
    op_kind: str
    """One of :data:`OP_KINDS`."""
    target: str
    """What runs: ``torch.nn.Linear``, ``aten.mm.default``, ``torch.softmax``, ``view`` ..."""
    inputs: list[str] = field(default_factory=list)
    """Names of the nodes whose outputs this node reads, in argument order."""
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    input_dtypes: list[str] = field(default_factory=list)
    output_shape: tuple[int, ...] | None = None
    """Shape of the (first) tensor output; None for non-tensor outputs."""
    output_dtype: str | None = None
    flops_fwd: float = 0.0
    flops_bwd: float = 0.0
    bytes_read: float = 0.0
    bytes_written: float = 0.0
    param_names: list[str] = field(default_factory=list)
    """Parameters read by this node (fully qualified names in the original model)."""
    param_bytes: float = 0.0
    """Bytes of parameters first read here (a shared / tied parameter counts once, at its first use)."""
    saved_bytes: float = 0.0
    """Activation bytes autograd saves for backward while running this node (measured, not guessed)."""
    gemm: tuple[int, int, int, int] | None = None
    """(batch, m, n, k) of a matmul-like node, for size-dependent efficiency; None otherwise."""
    module_path: str = ""
    """Dotted path of the innermost module that issued the op (``layers.3.attn.q_proj``)."""
    source: str = ""
    """``file.py:line`` of the user code that issued the op, when known."""
    block: int | None = None
    """Index of the repeated-block instance (transformer layer i) this node belongs to."""
    block_type: str | None = None
    """Key shared by identical blocks (``layers.*``); None outside repeated blocks."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Op-specific facts (e.g. ``heads``, ``dim`` of a softmax, view arguments)."""


@dataclass(kw_only=True)
class BlockType:
    """A repeated block structure: ``count`` instances with identical op sequences."""

    key: str
    count: int
    instances: list[int]
    """Block instance indices (positions in :attr:`OpGraph.block_order`)."""
    node_names: list[list[str]]
    """Per instance, its node names in order (all instances have the same length)."""


@dataclass(kw_only=True)
class OpGraph:
    """The analysed graph of a model with its loss."""

    nodes: list[OpNode]
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per unique parameter: ``{"shape": [...], "dtype": "float32", "bytes": n, "aliases": [...]}``."""
    block_types: dict[str, BlockType] = field(default_factory=dict)
    block_order: list[tuple[str, int]] = field(default_factory=list)
    """Block instances in execution order as ``(block_type, index within the type)``."""
    inputs: list[str] = field(default_factory=list)
    """Names of the placeholder nodes (model inputs, then loss targets)."""
    batch_size: int = 0
    """Batch size of the example inputs (dim 0), which FLOPs and bytes are measured at."""
    tracer: str = "symbolic_trace"
    """``symbolic_trace`` or ``export``."""
    gm: Any = None
    """The underlying ``torch.fx.GraphModule`` (not serialised)."""
    notes: list[str] = field(default_factory=list)
    """Things a person should know (fused attention shrinks saved activations, ...)."""
    local_profile: Any = None
    """Measured per-op times and layout numbers for profiled planning on this machine
    (:class:`autopar.estimator.local.LocalProfile`, attached by ``autopar.estimator.local.apply``;
    not serialised)."""

    def __post_init__(self) -> None:
        self._by_name = {n.name: n for n in self.nodes}

    def __getitem__(self, name: str) -> OpNode:
        return self._by_name[name]

    def __iter__(self) -> Iterator[OpNode]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    # -- totals
    @property
    def num_params(self) -> int:
        import math

        return sum(math.prod(p["shape"]) for p in self.params.values())

    @property
    def param_bytes(self) -> float:
        return sum(p["bytes"] for p in self.params.values())

    @property
    def flops_fwd(self) -> float:
        return sum(n.flops_fwd for n in self.nodes)

    @property
    def flops_bwd(self) -> float:
        return sum(n.flops_bwd for n in self.nodes)

    @property
    def saved_bytes(self) -> float:
        return sum(n.saved_bytes for n in self.nodes)

    def block_nodes(self, block: int) -> list[OpNode]:
        return [n for n in self.nodes if n.block == block]

    def totals_by_block(self) -> dict[int | None, dict[str, float]]:
        """Per block instance (None = outside blocks): summed flops, bytes, params, saved bytes."""
        out: dict[int | None, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for n in self.nodes:
            t = out[n.block]
            t["flops_fwd"] += n.flops_fwd
            t["flops_bwd"] += n.flops_bwd
            t["bytes"] += n.bytes_read + n.bytes_written
            t["param_bytes"] += n.param_bytes
            t["saved_bytes"] += n.saved_bytes
        return {k: dict(v) for k, v in out.items()}

    def to_networkx(self) -> nx.DiGraph:
        """A ``networkx.DiGraph`` with one vertex per node (attributes = the node's fields)."""
        import networkx as nx

        g = nx.DiGraph()
        for n in self.nodes:
            g.add_node(n.name, **{k: v for k, v in vars(n).items() if k != "name"})
        for n in self.nodes:
            for src in n.inputs:
                if src in self._by_name:
                    g.add_edge(src, n.name)
        return g
