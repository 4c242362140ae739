"""Predicted seconds per optimizer step for a layout, as a breakdown.

    compute      matmul FLOPs / (matmul throughput x efficiency at the matmul's inner width: d_model, d_model / tp
                 for TP's row-parallel linears), per layer and call at least its weight's bytes
                 / matmul_weight_Bps (few rows on a wide layer stream the weight), + elementwise bytes / memory bandwidth
                 + framework ops x op cost; backward = 2 x forward matmuls; full recompute adds a
                 forward (x recompute_share, calibrated) and a fixed cost per checkpointed block and
                 microbatch (checkpoint_call_s), selective the elementwise part of one plus its
                 dispatch modes' cost per op (selective_op_s) (Korthikanti et al. 2022, sec. 5); each
                 microbatch after the first a calibrated cost per block (microbatch_block_s); ZB-H1's
                 split backward under checkpointing recomputes twice and walks the activation gradients
                 twice (trainlib.pipeline.zero_bubble)
    tp           Megatron f/g: 2 all-reduces of the microbatch's activations per block in forward and 2
                 in backward (Shoeybi et al. 2019), 1 more per full recomputation, on the critical path; ring time 2(n-1)(a + M/(nB))
                 (trainlib.benchmarks.bench_ps.t_allreduce) plus a calibrated fixed cost per all-reduce;
                 across nodes the ring's bytes on the NIC at its rate, less what a token-bucket NIC (the
                 emulated cluster's tbf, ClusterSpec.nic_burst_bytes) refilled during the compute between
                 two collectives
    bubble       the pipeline runs the slowest rank's work stretched by makespan / busy of the schedule's
                 own unit-cost replay (trainlib.pipeline.schedules: (p-1)/m for GPipe/1F1B, (p-1)/(vm)
                 interleaved, (p-1)/(3m) ZB-H1), plus a fixed cost per action, per p2p transfer a rank
                 sends or receives (the schedule's own count) and per extra autograd call of ZB-H1's W; a rank
                 alone in a bubble computes solo_speedup x faster (CPU ranks share memory bandwidth)
    dp sync      gradient bytes over the dp group: ring inside a node (the shm transport's bytes past 8 MiB at
                 its DRAM rate), plus AccumulateGrad's copy of each gradient into its bucket; across nodes the bytes on the busiest
                 NIC (trainlib.benchmarks.bench_cluster.wire_bytes: hierarchical, each byte crosses once per
                 node) over the NIC's line rate x efficiency; ZeRO 1/2 = reduce-scatter of the gradients +
                 all-gather of the parameters, each half an all-reduce of its bytes (x the measured
                 rs_ag_over_ar of the transport that carries it: the node's shm, or gloo when compressed);
                 ZeRO-3 gathers again in backward, all but the unit kept from the forward, and pays a fixed
                 cost per unit gathered (zero3_unit_s: one unit per pipeline layer, twice per microbatch);
                 every stage a calibrated fixed cost per step over plain data parallel (zero_step_s), and
                 every all-reduce sync inside a node one over a device's step (dp_step_s);
                 across nodes the NIC sets the pace: reduce-scatter + all-gather move an all-reduce's bytes
                 (no rs_ag_over_ar; but on CPU a bucket's gloo reduce-scatter under 4 MiB is an all-reduce:
                 gloo_rs_halves) and ZeRO-3's prefetched unit gathers hide behind the unit before them;
                 bf16 compression halves the gradient bytes (not the parameters a sharded sync gathers),
                 goes through gloo on CPU, and costs a cast (sharded: a calibrated fixed cost per
                 collective it starts, compress_collective_s); the parameter server pays a fixed cost per sync and per 4 MB partition and the
                 busiest server's bytes (BytePS: max(M, n M / k), bench_ps.t_ps). Only the part that does
                 not hide behind the backward (profile "overlap") is added.
    optimizer    torch's foreach AdamW + clipping: ~84 bytes moved per owned parameter (OPT_BYTES_PER_PARAM)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from trainlib.benchmarks.bench_cluster import wire_bytes
from trainlib.benchmarks.bench_ps import t_allreduce

from .layouts import Layout
from .memory import (BUCKET0_BYTES, BUCKET_BYTES, STAGE, act_bytes, bucket_bytes, local_layer_params, schedule_facts,
                     stages_of)
from .profile import Profile
from .spec import ClusterSpec, ModelSpec

PARTITION_BYTES = 4 * 2**20      # the parameter server's partition (config.SyncConfig.partition_mb)
OPS_PER_BLOCK = 14               # forward ops of one GPT block (norms, linears, attention, views, adds)
SELECTIVE_REPLAY_SHARE = 0.5     # of selective_op_s, the recomputation's replay (the forward's record the rest)
# torch's foreach AdamW makes ~10 passes over parameter-sized fp32 arrays per step (lerp, mul, addcmul,
# sqrt, div, add, addcdiv, weight decay; 2 arrays each on average) and clipping reads the gradients: 84 B
OPT_BYTES_PER_PARAM = 84
SYNC_CACHE_BYTES = 8 * 2**20     # the largest all-reduce of the calibration's in-cache fit (calibrate.SIZES)


@dataclass(frozen=True)
class TimeBreakdown:
    compute: float
    tp: float
    bubble: float
    pp_actions: float
    dp_sync: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.compute + self.tp + self.bubble + self.pp_actions + self.dp_sync + self.optimizer

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 6) for k, v in asdict(self).items()}


def _elementwise_elements(model: ModelSpec, tp: int) -> float:
    """Elements read + written per token per block by the non-matmul ops of a forward."""
    d, f = model.d_model, model.ffn
    if model.kind == "mlp":
        return 2.0 * d
    return 10 * d + 2 * f / tp


def _ring(nbytes: float, n: int, alpha: float, bw: float) -> float:
    return t_allreduce(nbytes, n, bw, alpha)


def _node_sync(nbytes: float, n: int, prof: Profile, link: str) -> float:
    """The node's all-reduce; the shm transport's bytes past SYNC_CACHE_BYTES leave the caches and move at
    sync_dram_Bps (here 50 MB took 6.2 ms against 0.29 ms for 8 MB: 3.4x slower per byte)."""
    t = _ring(nbytes, n, prof[f"{link}_alpha_s"], prof[f"{link}_Bps"])
    dram = prof["sync_dram_Bps"] if link == "sync" else 0.0
    if dram > 0 and nbytes > SYNC_CACHE_BYTES:
        t += 2 * (n - 1) / n * (nbytes - SYNC_CACHE_BYTES) * max(0.0, 1 / dram - 1 / prof["sync_Bps"])
    return t


def matmul_seconds(model: ModelSpec, layers: list[int], tp: int, mb_tokens: float, flops_s: float,
                   prof: Profile, weight_bytes: int, narrow_flops_s: float | None = None) -> float:
    """Forward matmul seconds of one microbatch through these layers: each layer's calls at the FLOP rate,
    unless streaming its weight takes longer (a few rows on a wide layer: the wide MLP's 8 rows through a
    16 MiB weight took 2.3-3.0 ms a call here, about twice their FLOP-rate time; the GEMM packs the whole
    weight every call). flops_s: the rate at the model's width; narrow_flops_s: at its width / tp, the rate
    of the row-parallel linears, whose inner dimension tensor parallelism splits (ModelSpec.row_parallel_share).
    Its backward's two calls per weight (dX, dW) are bound alike: backward = 2 x forward."""
    w_bps = prof["matmul_weight_Bps"]
    narrow = narrow_flops_s or flops_s
    t = 0.0
    for lay in layers:
        share = model.row_parallel_share(lay) if tp > 1 else 0.0
        flop_t = model.matmul_flops_per_token(lay) / tp * mb_tokens * ((1 - share) / flops_s + share / narrow)
        stream_t = model.matmul_weights(lay) / tp * weight_bytes / w_bps if w_bps > 0 else 0.0
        t += max(flop_t, stream_t)
    return t


def _group_span(cluster: ClusterSpec, size: int, stride: int) -> tuple[int, int]:
    """(nodes, ranks per node) of a mesh group of `size` ranks `stride` apart (tp innermost, then dp, pp)."""
    per_node = max(1, min(size, cluster.devices_per_node // stride)) if stride <= cluster.devices_per_node else 1
    return max(1, math.ceil(size / per_node)), per_node


def nic_time(nbytes: float, cluster: ClusterSpec, prof: Profile, gap_s: float = 0.0) -> float:
    """Seconds for nbytes to leave a node's NIC. A token-bucket NIC (cluster.nic_burst_bytes) lets what it
    refilled during the gap_s of compute before the transfer, up to its burst, through at once."""
    rate = cluster.nic_Bps * prof["inter_efficiency"]
    return max(0.0, nbytes - min(cluster.nic_burst_bytes, gap_s * rate)) / rate


def allreduce_time(nbytes: float, size: int, stride: int, cluster: ClusterSpec, prof: Profile,
                   link: str = "intra", gap_s: float = 0.0) -> float:
    """One all-reduce of nbytes over a group (see the module docstring); link: "intra" (the
    collectives TP and PP use), "sync" (the data-parallel transport inside a node) or "compress" (a
    bf16 gradient all-reduce: the collective library's 16-bit path); gap_s: compute before it (nic_time)."""
    if size <= 1 or nbytes <= 0:
        return 0.0
    nodes, per_node = _group_span(cluster, size, stride)
    if nodes == 1:
        return _node_sync(nbytes, size, prof, link)
    groups_per_node = max(1, cluster.devices_per_node // per_node)   # the other groups share the NIC
    backend = "hierarchical" if per_node > 1 else "allreduce"
    wire = wire_bytes(backend, nbytes, nodes, per_node, 1) * groups_per_node
    t = nic_time(wire, cluster, prof, gap_s) + 2 * (nodes - 1) * prof["inter_alpha_s"]
    if per_node > 1:
        t += _node_sync(nbytes, per_node, prof, link)
    return t


def dp_sync_time(model: ModelSpec, layout: Layout, cluster: ClusterSpec, prof: Profile, params: float,
                 backward_s: float, units: int = 0, held_params: float = 0.0,
                 buckets: tuple[float, ...] = ()) -> float:
    """buckets: the fp32 bytes of each gradient bucket (memory.bucket_bytes; ZeRO-3: one per unit)."""
    if layout.dp == 1:
        return 0.0
    m = params * 4                      # gradients are reduced in fp32 (MixedPrecision's reduce_dtype)
    stride = layout.tp
    fixed = 0.0                         # per step, beside the overlap
    nodes, per_node = _group_span(cluster, layout.dp, stride)
    if layout.sync == "ps":
        servers = nodes                 # colocated: one server per node
        msgs = math.ceil(m / PARTITION_BYTES)
        cpu = prof["ps_sync_s"] + msgs * prof["ps_msg_s"] + max(m, layout.dp * m / servers) / prof["ps_Bps"]
        wire = 0.0
        if nodes > 1:
            wire = (wire_bytes("ps_colocated", m, nodes, per_node, servers)
                    / (cluster.nic_Bps * prof["inter_efficiency"]))
        # a partition is pushed, summed and pulled in turn: across partitions the servers' work and the
        # wire overlap, within one they do not (a two-stage pipeline of `msgs` pieces: the longer stage
        # whole, the shorter one piece's worth). Across the emulated link the default GPT's one
        # partition took about cpu + wire, the wide MLP's twelve about the wire
        t = max(cpu, wire) + min(cpu, wire) / msgs
    else:
        compress = layout.compress == "bf16"
        wire_m = m / 2 if compress else m
        # on CPU a compressed sync goes through torch (gloo), gradients in bf16 and, sharded, parameters
        # gathered in their own dtype; uncompressed, every collective takes the node's transport (shm,
        # ZeRO-2/3 included: their gradients are packed into its buffers): README "Gradient sync", "ZeRO"
        link = "compress" if compress else "sync"
        if STAGE[layout.shard] == 0:
            t = allreduce_time(wire_m, layout.dp, stride, cluster, prof, link)
        else:
            # reduce-scatter + all-gather(s), each half an all-reduce's bytes; ZeRO-3 gathers again in
            # backward, all but the unit that ran last (held_params: kept gathered for its backward)
            ag_link = "intra" if compress else "sync"
            ab = act_bytes(layout.precision)
            if nodes == 1:
                gathered = params + (params - held_params if layout.shard == "parameters" else 0.0)
                rs = allreduce_time(wire_m, layout.dp, stride, cluster, prof, link) * _rs_ag_factor(link, prof) / 2
                ag = allreduce_time(gathered * ab, layout.dp, stride, cluster, prof, ag_link) * _rs_ag_factor(ag_link, prof) / 2
                if compress:
                    # gloo's reduce-scatters start as buckets fill and run on its own thread beside the
                    # backward (compress_overlap of it, calibrated); the all-gathers follow the optimizer
                    # step with nothing to hide behind
                    rs = max(0.0, rs - prof["compress_overlap"] * backward_s)
                t = rs + ag
            else:
                rs_halves = gloo_rs_halves([b * wire_m / m / per_node for b in buckets])
                t = _sharded_across_nodes(layout, cluster, prof, nodes, wire_m * rs_halves, params * ab,
                                          held_params * ab, units, backward_s, link, ag_link)
            if compress:   # torch's collectives, inside a node or across: one wait for the slower rank each
                t += sharded_collectives(layout, m, units) * prof["compress_collective_s"]
        if STAGE[layout.shard] >= 1:
            t += prof["zero_step_s"]
        if layout.shard == "parameters":
            m_mb = layout.microbatches if layout.pp > 1 else 1
            t += 2 * units * m_mb * prof["zero3_unit_s"]
        if layout.compress == "bf16":
            t += 2 * (m + m / 2) / prof["mem_Bps"]   # cast to bf16 and back, both ways
        else:   # AccumulateGrad copies each gradient into its bucket (the cast does, compressed)
            t += 2 * m / prof["mem_Bps"]
        # hidden behind nothing: the wrapper's own work each step inside a node, where the dp=2 probe measured
        # it (the PS's is in ps_sync_s); across nodes the link's sounded rate (inter_efficiency) holds it:
        # added there too, the emulated cluster's DP rows read 0.9x and two runs' first choice flipped to a
        # pipeline 11-18% slower
        if nodes == 1:
            fixed = prof["dp_step_s"]
    return max(0.0, t - prof["overlap"] * backward_s) + fixed


def gloo_rs_halves(wire_sizes: list[float]) -> float:
    """A CPU reduce-scatter across nodes (gloo) in all-gather-sized halves of an all-reduce, averaged over
    the buckets by bytes: trainlib.comm runs one below GLOO_P2P_MIN_BYTES as an all-reduce keeping its
    chunk (2 halves: gloo's own reduce-scatter is slower still), from there as point-to-point sends (1).
    Measured across the emulated 1 Gbit/s link (2 nodes): 1 and 3 MiB took 8.0 and 25.6 ms, as long as
    their all-reduces; 6 and 16 MiB 25.3 and 72 ms, half their all-reduces' 52 and 140 ms."""
    from trainlib.comm import GLOO_P2P_MIN_BYTES

    total = sum(wire_sizes)
    if total <= 0:
        return 1.0
    return sum(b * (2.0 if b < GLOO_P2P_MIN_BYTES else 1.0) for b in wire_sizes) / total


def _rs_ag_factor(link: str, prof: Profile) -> float:
    """Reduce-scatter + all-gather over an all-reduce of the same bytes, on the transport that carries
    `link`: the node's own ("sync": shm on CPU, ~1: each half moves half the bytes) or the collective
    library's (gloo's reduce-scatter took 2x its all-reduce here)."""
    return prof["sync_rs_ag_over_ar" if link == "sync" else "rs_ag_over_ar"]


def _sharded_across_nodes(layout: Layout, cluster: ClusterSpec, prof: Profile, nodes: int, grad_bytes: float,
                          param_bytes: float, held_bytes: float, units: int, backward_s: float,
                          link: str, ag_link: str) -> float:
    """A ZeRO sync whose dp group spans nodes, where the NIC sets the pace: the reduce-scatter and the
    all-gather move exactly an all-reduce's bytes (rs_ag_over_ar is a local collective's overhead).
    ZeRO-3 gathers one unit at a time, the next one prefetched: a gather's wire time hides behind the
    compute of the unit before it (forward: a third of a unit's step, backward: two thirds), and the NIC
    idles (refills its burst) meanwhile; only what is left over is exposed."""
    def half(nbytes: float, ln: str, gap: float = 0.0) -> float:   # a reduce-scatter or an all-gather
        return allreduce_time(nbytes, layout.dp, layout.tp, cluster, prof, ln, gap) / 2

    if layout.shard != "parameters" or units < 1:
        return half(grad_bytes, link) + half(param_bytes, ag_link)
    unit_bytes = param_bytes / units
    fwd_s, bwd_s = backward_s / 2 / units, backward_s / units
    # a gather's latency (its rendezvous with the other nodes) is paid where it is waited for; its bytes
    # move while the unit before it computes
    latency = (nodes - 1) * prof["inter_alpha_s"]

    def exposed(window: float) -> float:
        return latency + max(0.0, half(unit_bytes, ag_link, window) - latency - window)

    first = half(unit_bytes, ag_link)          # nothing to hide the first forward gather behind
    # backward gathers every unit but the one kept from the forward, each behind the unit after it
    return (half(grad_bytes, link) + first + (units - 1) * exposed(fwd_s)
            + (param_bytes - held_bytes) / unit_bytes * exposed(bwd_s))


def _autograd_modules(model: ModelSpec, layer: int, last: int) -> int:
    """Parameter-owning modules of a pipeline layer that ZB-H1's W backs up one at a time: a GPT block's 2
    LayerNorms and 4 Linears, a Llama block's 2 norms and 7 projections, the final norm and head; the
    embeddings get one backward together."""
    if model.kind == "mlp" or layer == 0:
        return 1
    if layer == last:
        return 2
    return 6 if model.kind == "gpt" else 9


def sharded_collectives(layout: Layout, grad_bytes: float, units: int) -> int:
    """Collectives a ZeRO sync starts per step: stages 1/2 a reduce-scatter and an all-gather per bucket
    (DDP's 1 MB first bucket, then 25 MB ones); ZeRO-3 per unit a reduce-scatter and two gathers (forward,
    backward) but the backward one of the unit kept from the forward."""
    if layout.shard == "parameters":
        return max(1, 3 * units - 1)
    return 2 * (1 + math.ceil(max(0.0, grad_bytes - BUCKET0_BYTES) / BUCKET_BYTES))


def step_time(model: ModelSpec, layout: Layout, cluster: ClusterSpec, prof: Profile, global_batch: int) -> TimeBreakdown:
    ab = act_bytes(layout.precision)
    per_rank = global_batch // layout.dp
    m = layout.microbatches if layout.pp > 1 else 1
    tok_per_seq = model.seq_len if model.kind != "mlp" else 1
    tokens = per_rank * tok_per_seq
    mb_tokens = tokens / m
    # matmuls run one microbatch at a time: tokens per call set how well they fill the machine
    # a matmul's rate follows its inner dimension: tensor parallelism narrows only the row-parallel ones
    flops_s = prof.matmul_flops(layout.precision, rows=mb_tokens, width=model.d_model)
    narrow_s = prof.matmul_flops(layout.precision, rows=mb_tokens, width=model.d_model / layout.tp)
    last = model.pipeline_layers() - 1
    recompute = {"none": 0.0, "selective": 0.0, "full": 1.0}[layout.ac]
    # ZB-H1's split backward recomputes a checkpointed block for I and again for W
    redo = 2.0 if layout.pp > 1 and layout.schedule == "zb-h1" and layout.ac != "none" else 1.0
    recompute *= redo
    worst: tuple[float, float, float] | None = None
    sync_max = opt_max = 0.0
    w_calls: list[int] = []   # per pp rank: ZB-H1's W calls, one per parameter-owning module and microbatch
    for stages in stages_of(model, layout):
        layers = [lay for s in stages for lay in s]
        w_calls.append(m * sum(_autograd_modules(model, lay, last) for lay in layers))
        blocks = sum(1 for lay in layers if model.kind == "mlp" or 0 < lay < last)
        elem = blocks * _elementwise_elements(model, layout.tp) * tokens * ab
        if model.kind != "mlp" and last in layers:
            elem += 4 * tokens * model.vocab_size / layout.tp * 4     # softmax + loss + their gradients
        ops = blocks * OPS_PER_BLOCK * m
        elem_fwd = elem / prof["mem_Bps"]
        fwd = m * matmul_seconds(model, layers, layout.tp, mb_tokens, flops_s, prof, ab, narrow_s) + elem_fwd
        # op_s already holds an op's backward; recomputation runs the forward ops again
        op_t = ops * prof["op_s"] * (1 + (0.5 if layout.ac != "none" else 0.0))
        if layout.ac == "selective":
            # its dispatch mode runs every op twice, recording in the forward and replaying in the
            # recomputation: ZB-H1's second recomputation pays the replay's half again, not both halves
            # (charging both read 0.98 / 0.92 / 0.85x at m = 2 / 4 / 8 over five validation runs, the
            # half 1.03 / 1.01 / 0.97x)
            op_t += (1 + (redo - 1) * SELECTIVE_REPLAY_SHARE) * ops * prof["selective_op_s"]
        elif layout.ac == "full":   # each checkpointed block, each microbatch, each recomputation
            op_t += redo * blocks * m * prof["checkpoint_call_s"]
        # every microbatch after the first accumulates into the gradients and builds its own graph
        op_t += (m - 1) * blocks * prof["microbatch_block_s"]
        # ZB-H1's W under checkpointing is one backward from every module output: the activation
        # gradients (about a forward's work) are walked again
        walk = fwd if redo > 1 else 0.0
        compute = (fwd * (3 + recompute * prof["recompute_share"]) + walk
                   + (redo * elem_fwd if layout.ac == "selective" else 0.0) + op_t)
        tp_t = 0.0
        if layout.tp > 1:
            # recomputing a block redoes only its attention's all-reduce: torch's checkpoint stops after the
            # last tensor backward needs (the MLP's reduction ends the block), and selective checkpointing
            # replays the reductions (activation_checkpointing.kept_collective)
            n_coll = m * (blocks * (4 + recompute) + 3)
            per_mb = allreduce_time(mb_tokens * model.d_model * ab, layout.tp, 1, cluster, prof,
                                    gap_s=compute / n_coll)
            tp_t = (per_mb + prof["tp_collective_s"]) * n_coll
        params = sum(local_layer_params(model, lay, layout.tp) for lay in layers) * model.param_scale
        backward_s = compute * 2 / 3
        held = local_layer_params(model, layers[-1], layout.tp) * model.param_scale if layout.pp == 1 else 0.0
        sync = dp_sync_time(model, layout, cluster, prof, params, backward_s, units=len(layers), held_params=held,
                            # only a sharded sync on CPU reads them (gloo's reduce-scatter form)
                            buckets=bucket_bytes(model, layout, layers)
                            if layout.dp > 1 and STAGE[layout.shard] >= 1 and cluster.device == "cpu" else ())
        owned = params / layout.dp if STAGE[layout.shard] >= 1 else params
        opt = owned * OPT_BYTES_PER_PARAM / prof["mem_Bps"]
        if worst is None or compute + tp_t > worst[0]:
            worst = (compute + tp_t, compute, tp_t)
        sync_max, opt_max = max(sync_max, sync), max(opt_max, opt)
    assert worst is not None
    _, compute, tp_t = worst
    sync, opt = sync_max, opt_max
    bubble = actions = 0.0
    if layout.pp > 1:
        _, stretch, per_rank, _ = schedule_facts(layout.schedule, layout.pp, m)
        n_actions = max(a for a, _ in per_rank)
        bubble = (compute + tp_t) * (stretch - 1) / prof["solo_speedup"]
        stage_nodes, _ = _group_span(cluster, layout.pp, layout.tp * layout.dp)
        msg = mb_tokens * model.d_model * ab
        if stage_nodes > 1:   # the node's devices send their stage's messages through one NIC at once
            p2p = prof["inter_alpha_s"] + nic_time(msg * max(1, cluster.devices_per_node), cluster, prof,
                                                   gap_s=compute / n_actions)
        else:
            p2p = prof["intra_alpha_s"] + msg / prof["intra_Bps"]
        # per rank: a fixed cost per action, per transfer it sends or receives, and per extra autograd
        # call of ZB-H1's W (one per parameter-owning module; one for the whole stage when checkpointed)
        per_call = prof["grad_call_s"] if layout.schedule == "zb-h1" and layout.ac == "none" else 0.0
        actions = max(a * prof["pp_action_s"] + msgs * p2p + w * per_call
                      for (a, msgs), w in zip(per_rank, w_calls))
    return TimeBreakdown(compute, tp_t, bubble, actions, sync, opt)
