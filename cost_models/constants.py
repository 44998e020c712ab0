"""Every constant of the cost model in one place, each with its source.

A :class:`Calibration` is plain data: the estimator, the planner and the fidelity benchmark all
take one. :data:`DEFAULT` is the set fitted once, on all published rows together, by
``benchmarks/fidelity.py --fit`` (procedure and cross-validation in ``docs/cost_model.md``).
Constants marked *fitted* are the only ones the fit touches; the others come from datasheets,
papers or measurements and are never tuned.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """Efficiency factors and software behaviour assumed by the cost model."""

    # ---------------------------------------------------------------- compute (cost_models.compute)
    gemm_max_efficiency: float = 0.693
    """*fitted* (band 0.6-0.9). Fraction of dense tensor-core peak the main loop of a large GEMM
    reaches in training. Isolated cuBLAS fp16 benchmarks on A100 reach about 0.75-0.85 of 312 TFLOP/s
    at m=n=k >= 4096 (NVIDIA, "Matrix Multiplication Background User's Guide"); the fitted 0.693
    (216 TFLOP/s) is lower because it also absorbs what the model leaves out: sustained-load clocks,
    gaps between kernels, transposed operand layouts."""
    gemm_wave_elements: float = 1.77e6
    """Work units (output elements x 256-deep k slices) of one full wave of GEMM tiles: A100 has 108
    SMs, one 128x128 output tile per SM per wave (NVIDIA "Matrix Multiplication Background": tile
    and wave quantization) -> 108 * 128 * 128 = 1.77e6. Utilisation is x / (x + this)."""
    fused_attention_efficiency: float = 0.6
    """Fraction of peak a fused (flash) attention kernel reaches, forward and backward together:
    FlashAttention-2 on A100 runs at 50-73% of the fp16 peak for head dim 128 (Dao 2023,
    "FlashAttention-2", Fig. 5-7). Multiplied by the wave factor of its output."""
    hbm_efficiency: float = 0.85
    """Fraction of datasheet HBM bandwidth a streaming kernel reaches: A100-80GB copies at about
    1.7-1.75 TB/s of 2.039 (BabelStream / NVIDIA "GPU Performance Background", memory-bound ops
    reach 80-90% of peak bandwidth)."""
    kernel_overhead_s: float = 4e-6
    """Fixed cost of one kernel (launch + tail): CUDA launch latency is 3-5 us (NVIDIA CUDA C++ Best
    Practices Guide, "Asynchronous transfers"; measured by many, e.g. PyTorch dev-discuss)."""
    causal_attention_skip: bool = True
    """A fused causal attention kernel computes only the score tiles on and below the diagonal:
    FlashAttention-2/3, cuDNN's fused attention (Transformer Engine) and PyTorch's flash SDPA backend
    loop each query tile over the key tiles up to the diagonal, so they execute ``1/2 + t/(2s)`` of
    the whole ``s x s`` work (tiles of ``t = 128``), and their published TFLOP/s count that half
    (flash-attn's ``benchmark_flash_attention.py`` halves the FLOPs of causal runs; the Azure H100 and
    H200 figures of :mod:`cost_models.hardware` are its causal, head-dim-128 entries, which the
    Azure guide's ``Benchmarks/NVIDIA/FlashAttention.py`` records; its A100 figure does not say).
    Model FLOPs (MFU) keep the whole square, Megatron's convention. False: a kernel whose rate is only known per whole-square FLOP
    (``composer``: the rows ran llm-foundry's Triton kernel, whose own rate no source gives; the
    whole square at FlashAttention-2's rate equals the executed half at a FlashAttention 1.x-class
    kernel's, FlashAttention-2 being "2x faster" per the flash-attention README's changelog)."""
    fuse_elementwise: bool = True
    """Chains of memory-bound ops between two GEMMs run as one fused kernel (Megatron's fused
    bias-GeLU, bias-dropout-add, scale-mask-softmax and Apex LayerNorm; torch.compile does the same).
    Their traffic is then the chain's external inputs and outputs only."""
    fused_norms: bool = True
    """A normalisation layer written as several tensor ops (an RMSNorm's ``pow``, ``mean``, ``rsqrt``
    and products, as Llama-style and HuggingFace models write it) runs as one kernel that reads its
    input and weight and writes its output: Megatron's and Apex's ``FusedRMSNorm`` /
    ``FusedLayerNorm``, Transformer Engine's ``RMSNorm`` / ``LayerNorm``. False: eager PyTorch, one
    kernel per op (a ``LayerNorm`` module is one kernel either way)."""
    fuse_sibling_gemms: bool = True
    """Linears that read the same tensor with the same reduction dim run as one GEMM with the output
    widths added (Megatron's fused QKV projection; fused gate/up projections of SwiGLU MLPs)."""
    bwd_bytes_factor: float = 1.5
    """Backward traffic of a memory-bound op relative to its forward: a unary op's backward reads the
    output gradient and the saved input (or output) and writes the input gradient, 3 tensors against
    the forward's 2 (LayerNorm, GeLU, softmax backward kernels in Megatron / Apex)."""

    # -------------------------------------------------------------- communication (cost_models.comm)
    intra_node_efficiency: float = 230.0 / 300.0
    """Achievable NCCL bus bandwidth / per-GPU NVLink bandwidth inside a node: 230 GB/s of 300 GB/s on
    A100 NVSwitch (NCCL maintainer, NVIDIA/nccl-tests issue 149)."""
    inter_node_efficiency: float = 0.96
    """Achievable bandwidth / NIC line rate across nodes: "24GB/s is the peak performance per 200G
    NIC (12 GB/s for 100G NICs)" (NCCL maintainer, NVIDIA/nccl-tests issue 119, 2022-11-17), i.e.
    24 / 25 GB/s; NDR 400 Gb/s NICs "should see 46-48GB/s per NIC" (nccl-tests issue 290), 0.92-0.96
    of 50 GB/s. A measurement, not fitted: it used to be, and only SC'21's ZeRO-3 rows constrained
    it (the fit ended at 0.96, the band's top); a fit without those rows drifted to 0.5 and broke
    them (docs/cost_model.md, section 7)."""
    ring_node_nics: bool = True
    """A ring (or tree) over ``r`` ranks per node on ``N`` nodes moves each node's share of the data
    across the network once per ring, through the NICs of its ``r`` ranks (NCCL: one channel per
    NIC, rail-optimised fabrics): its bus bandwidth is ``min(r * B_nic, B_nvlink)``, not the per-GPU
    NIC rate (:func:`cost_models.comm.ring_bandwidth_bytes_per_s`). Measured: 3 nodes x 8 A100 with
    4 HDR NICs each (100 GB/s per node, 12.5 GB/s per GPU) reach an all-reduce bus bandwidth of
    84.8 GB/s on average and 96 GB/s at the peak (NVIDIA/nccl-tests issue 119); two A100 nodes with
    8 x 100 Gb/s NICs reach 600 Gb/s, which the NCCL maintainers call "roughly matching our
    expectation" (NVIDIA/nccl issue 495). ``False``: every ring step crosses a NIC (the per-GPU
    rate; DeepSpeed ZeRO-3 in 2021, :data:`cost_models.hardware.FRAMEWORKS`)."""
    all_gather_time_scale: float = 1.0
    """The bandwidth term of a ring all-gather, times this. 1 for NCCL, whose all-gather and
    reduce-scatter reach the all-reduce's bus bandwidth (nccl-tests); the profiled mode measures
    gloo's (``autopar.estimator.local``), which runs each kind its own way."""
    reduce_scatter_time_scale: float = 1.0
    """The same for reduce-scatter."""
    collective_base_latency_s: float = 8.4e-6
    """Fixed latency per collective call (NCCL src/graph/tuning.cc baseLat, Ring/Simple)."""
    tp_comm_overlap: float = 0.0
    """Fraction of tensor-parallel collective time hidden behind compute. Megatron-LM (SC'21) runs the
    TP all-reduces synchronously on the critical path: 0."""
    tp_comm_pipelined: bool = False
    """Tensor-parallel all-gathers and reduce-scatters run in ``tp`` chunks pipelined with the GEMM
    that consumes or produces them (Transformer Engine's userbuffers overlap, NeMo's
    ``tp_comm_overlap=True``; Wang et al. 2023, "Overlap communication with dependent computation
    via decomposition", ASPLOS): each chunk's transfer runs under the previous chunk's GEMM, so one
    chunk of ``tp`` stays exposed: the exposed time is ``1 / tp`` of the collective's (in place of
    ``1 - tp_comm_overlap``). Requires sequence parallelism in Megatron-Core, as in the runs that
    use it."""
    dp_overlap: bool = True
    """Data-parallel gradient reduction overlaps the backward pass (PyTorch DDP buckets, which autopar
    lowers to; Megatron's ``--DDP-impl torch`` in Table 1 rows 1-4). The overlap window is the
    backward of the last micro-batch (earlier ones run under ``no_sync``)."""
    dp_last_bucket_bytes: float = 25 * 2**20
    """The last DDP bucket cannot overlap anything: 25 MiB, PyTorch DDP's ``bucket_cap_mb`` default."""
    zero3_prefetch_overlap: bool = True
    """ZeRO-3 / FSDP prefetch the next layer's parameters while computing this one, so gathers overlap
    compute (DeepSpeed ``prefetch_bucket_size``, FSDP ``forward_prefetch``)."""
    zero_fsdp2: bool = False
    """ZeRO-2/3 run as autopar's runtime runs them: FSDP2 ``fully_shard`` per repeated block and per
    stage (each a unit with its own collectives), gradients reduce-scattered on the last micro-batch
    only; ZeRO-2 keeps the parameters gathered through the step (one gather per unit); ZeRO-3
    gathers for each forward and backward, except that ``torch.distributed.pipelining``'s 1F1B
    schedules keep them gathered from a backward to the next forward (stage ``s`` of ``p``:
    ``m + min(m, p - s)`` gathers per step, :func:`cost_models.step.zero3_counts`). False:
    DeepSpeed's ZeRO (the SC'21 rows): every micro-batch gathers in forward and backward and
    reduce-scatters, ZeRO-2 syncs each stage as one message. Set by the profiled mode
    (``autopar.estimator.local``), whose runs are autopar's own."""
    zero3_regather_for_recompute: bool = True
    """ZeRO-3 gathers a block's parameters a third time for its recomputed forward (DeepSpeed ZeRO-3
    under Megatron's checkpointing, the SC'21 rows). PyTorch FSDP runs the checkpointed forward inside
    the backward's gathered window (``FullyShardedDataParallel`` pre-backward hook), so it gathers
    twice: False (:data:`cost_models.hardware.FRAMEWORKS` ``fsdp``)."""
    overlap_sharpness: float = 2.29
    """*fitted.* Overlapped compute ``C`` and communication ``K`` take ``(C^p + K^p)^(1/p)``: ``p -> inf``
    is perfect overlap (``max``), ``p = 1`` none (sum). Overlap is worst when the two are comparable
    (both compete for SMs and HBM; per-layer jitter makes the sum of per-layer maxima exceed the max
    of the sums). *fitted* (band 1-8); pinned by the ZeRO-3 rows of Narayanan et al. Table 2 at 384
    and 640 GPUs, where compute and parameter gathers take about as long as each other."""
    pp_p2p_blocking: bool = True
    """Pipeline send/recv sit on the critical path (Megatron's ``send_forward_recv_backward`` waits)."""
    pp_p2p_overlap_interleaved: bool = False
    """Under the interleaved schedule, pipeline sends and receives run asynchronously under the next
    chunk's compute and leave the critical path (Megatron-Core ``overlap_p2p_comm``, which NeMo's
    ``MegatronCommOverlapCallback`` switches on whenever ``vp > 1``)."""
    megatron_distributed_optimizer: bool = False
    """ZeRO-1 as Megatron-Core's distributed optimizer runs it with NeMo's overlap settings
    (``MegatronCommOverlapCallback``, data-parallel size > 1: ``overlap_grad_reduce``,
    ``overlap_param_gather``, buckets of 128 Mi parameters): gradients are reduce-scattered (not all-reduced)
    bucket by bucket under the backward, and the updated parameters all-gathered under the next
    step's forward. False: autopar's own ZeRO-1 (DDP all-reduce, then an exposed all-gather)."""
    ep_dispatch_per_rank: bool = False
    """Mixture-of-experts dispatch sends a token once to each rank holding any of its experts (DeepEP,
    github.com/deepseek-ai/DeepEP: the dispatch layout marks which ranks a token goes to), not once
    per expert as autopar's all-to-all does (:func:`cost_models.moe.ranks_per_token`)."""
    pp_scatter_gather: bool = True
    """Megatron's scatter/gather optimisation: with tp > 1 each TP rank sends only 1/tp of the
    activation across nodes, then an intra-node all-gather rebuilds it (Narayanan et al. §4.1)."""

    # ------------------------------------------------------------------ training-loop extras
    train_metric_passes: float = 0.0
    """Forward-only passes over the loss's input (the logits) that the training loop adds per
    micro-batch, outside the model. 0 for Megatron and a plain loop. MosaicML Composer (llm-foundry's
    trainer) updates its train metrics after every micro-batch's backward (``Trainer._train_microbatch``
    -> ``_eval_train_metrics``, under the run's autocast); llm-foundry's MPT registers two,
    ``LanguageCrossEntropy`` and ``LanguagePerplexity``, each a ``torch.nn.CrossEntropyLoss`` over the
    whole logits tensor (``composer/metrics/nlp.py``): 2 (:data:`cost_models.hardware.FRAMEWORKS`
    ``composer``). Memory-bound: with a 50k vocabulary the logits are the largest tensor of a small
    model, which is why this matters most for 125M-1B models."""
    train_metric_bytes_factor: float = 7.0
    """HBM bytes one metric pass moves per byte of 16-bit logits. ``cross_entropy`` is on autocast's
    float32 list (PyTorch AMP docs, "CUDA Ops that can autocast to float32"): a cast kernel reads 2 B
    and writes 4 B per element, then the fp32 ``log_softmax`` reads 4 B and writes 4 B (``nll_loss``
    reads one element per row): 14 B per 2-byte element = 7."""

    grad_reduce_bytes: float = 0.0
    """Bytes per gradient element the data-parallel reduction moves (all-reduce, ZeRO's
    reduce-scatter); 0: the compute dtype's (2 for fp16/bf16, as Megatron and DDP reduce). 4 where
    the framework reduces 16-bit gradients in float32: Composer's FSDP ``mixed_precision: DEFAULT``
    sets ``reduce_dtype=torch.float32`` (mosaicml/composer ``composer/trainer/mosaic_fsdp_utils.py``
    ``get_mixed_precision``; :data:`cost_models.hardware.FRAMEWORKS` ``composer``), and torchtitan,
    whose ``mixed_precision_reduce`` defaults to ``"float32"`` (its job config; ``fsdp``)."""

    loss_bytes_factor: tuple[float, float] = (19.0, 7.0)
    """HBM bytes the training loss (cross-entropy over the logits) moves, forward and backward, per
    byte of the logits as traced (16-bit on a GPU). () : the traced op's own traffic. The default is
    Megatron-LM's ``vocab_parallel_cross_entropy``, which runs on ``output.float()``
    (``--fp16-lm-cross-entropy`` off by default) and, unfused (Megatron-Core's
    ``cross_entropy_loss_fusion`` off by default), makes these passes per 2-byte logit: forward the
    fp32 cast (2 read, 4 written), ``max`` (4), ``sub_`` (4 + 4), ``exp`` (4 + 4), ``sum`` (4) and the
    in-place softmax ``div_`` kept for the backward (4 + 4): 38 B = 19 x 2; backward ``mul_`` by the
    output gradient (4 + 4) and the cast back (4 + 2): 14 B = 7 x 2. A fused kernel (Megatron-Core's
    and Transformer Engine's fused cross-entropy, flash-attn's ``CrossEntropyLoss``) reads the logits
    once forward and once backward and writes their gradient: (1, 2). Eager PyTorch on ``.float()``
    logits (cast, ``log_softmax``; backward ``nll_loss`` gradient, ``log_softmax`` backward, cast):
    (7, 11); on 16-bit logits: (2, 4). :data:`cost_models.hardware.FRAMEWORKS` sets each."""

    # ------------------------------------------------------------------ optimizer and memory
    optimizer_bytes_per_param: float = 36.0
    """HBM traffic of a mixed-precision Adam step per parameter: read fp16/fp32 grad (4), fp32 master,
    m, v (12), write master, m, v (12), write fp16 weight (2), plus the unscale/clip pass over the
    fp32 grads (6): 36 bytes (Megatron FusedAdam, Apex multi-tensor apply)."""
    runtime_reserved_bytes: float = 0.0
    """Memory taken before the model (CUDA context ~0.5 GB, cuBLAS workspaces, NCCL buffers,
    allocator fragmentation). 0 because device capacities follow the datasheet-GB convention
    (``autopar.cluster.hardware``: an "80 GB" A100 has 85.9e9 B, so 80e9 already leaves ~6 GB for these)."""

    def with_(self, **changes: float) -> Calibration:
        """A copy with some constants replaced (names checked)."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise KeyError(f"unknown calibration constant(s) {sorted(unknown)}; known: {sorted(known)}")
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


FIT_BOUNDS = {
    "gemm_max_efficiency": (0.6, 0.9),
    "overlap_sharpness": (1.0, 8.0),
}
"""The constants the fidelity fit may change, each within its physically plausible band (see the
field docs); every other constant is fixed by its source."""
FITTED = tuple(FIT_BOUNDS)

DEFAULT = Calibration()
"""The calibration every caller gets unless it passes its own."""
