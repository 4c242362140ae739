"""Peak bytes per device for a layout: model states + saved activations + transient buffers.

Model states: parameters local to the device (tp-split matrices, its pipeline stages) times ZeRO's
bytes per parameter (trainlib.benchmarks.bench_zero.formula: 16 / 4+4+8/d / 4+12/d / 16/d in fp32).
Activations: what autograd keeps per token per block, counted on trainlib's GPT with a storage
tracker (benchmarks/ac_memory.py; tests/test_planner.py checks the counts on a real model):

    none        4d replicated + (4d + 2f)/tp       (LayerNorm in/out x2; qkv, attention out, fc, GELU out)
    selective   3d replicated + (4d + f)/tp        (matmul and attention outputs kept, elementwise recomputed;
                + 2d at tp > 1                      the 2 all-reduced outputs kept too: kept_collective)
    full        d (the block input), plus one block's "none" set while it is recomputed

(Korthikanti et al. 2022 count 34 s b h bytes per layer in fp16 with dropout masks, i.e. 17 h elements;
trainlib's GPT has no dropout: 16 d.) Llama blocks (SwiGLU): 4d + (2d + 2 kv + 4f)/tp. ZB-H1 also holds
the gradients of the matmul outputs between a block's I and W (2d + (3d + f)/tp) and what recompute rebuilt.
A pipeline rank holds the activations of every microbatch it has run forward and not yet backward;
that count comes from the schedule itself (trainlib.pipeline.schedules), not a rule of thumb.
Transients: the largest gradient autograd makes before a bucket hook moves it, the optimizer's
temporaries (one parameter-sized buffer for torch's foreach AdamW), the logits' gradient, ZeRO-3's
gathered unit plus the one prefetched, the bf16 pack buffer, ZeRO-2/3's shared reduce buffers on a CPU
node's shm transport (a rank's own, and its chunk of each peer's, count in its RSS), and the runtime's
own bytes (profile).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from trainlib.benchmarks.bench_zero import formula as zero_bytes_per_param
from trainlib.config import SyncConfig
from trainlib.pipeline.partition import balance
from trainlib.pipeline.schedules import SCHEDULES, build_schedule, theory_bubble
from .layouts import Layout
from .spec import ModelSpec

SIMULATE_UP_TO = 256   # pp * microbatches * virtual stages replayed exactly; above, (p-1)/m and kin
STAGE = {"none": 0, "optimizer": 1, "gradients": 2, "parameters": 3}
BUCKET_BYTES = SyncConfig().bucket_mb * 2**20   # the bucket `trainlib train` builds (--sync.bucket_mb)


def act_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def local_layer_params(model: ModelSpec, layer: int, tp: int) -> float:
    """Parameters of pipeline layer `layer` on one tp rank (Megatron: matrices and their column biases
    split, LayerNorms and row-parallel biases replicated, vocabulary split)."""
    d, f, v = model.d_model, model.ffn, model.vocab_size
    total = model.layer_params()[layer]
    if tp == 1 or model.kind == "mlp":
        return float(total)
    last = model.pipeline_layers() - 1
    if layer == 0:
        pos = model.seq_len * d if model.kind == "gpt" else 0
        return v * d / tp + pos
    if layer == last:
        norm = 2 * d if model.kind == "gpt" else d
        return norm + (total - norm) / tp
    replicated = 6 * d if model.kind == "gpt" else 2 * d   # gpt: 2 LayerNorms + 2 row-parallel biases
    return replicated + (total - replicated) / tp


def block_act_elements(model: ModelSpec, tp: int, ac: str) -> float:
    """Elements saved per token per block (see the module docstring)."""
    d, f = model.d_model, model.ffn
    if model.kind == "mlp":
        return 2.0 * d
    kv = model.kv_heads * (d // model.n_head)
    if ac == "full":
        return float(d)
    kept_reductions = 2 * d if tp > 1 else 0.0   # selective: the tensor-parallel all-reduces' outputs
    if model.kind == "llama":
        return (4 * d + (2 * d + 2 * kv + 4 * f) / tp if ac == "none"
                else 3 * d + kept_reductions + (2 * d + 2 * kv + 2 * f) / tp)
    return 4 * d + (4 * d + 2 * f) / tp if ac == "none" else 3 * d + kept_reductions + (4 * d + f) / tp


def _held_elements(model: ModelSpec, layout: Layout) -> float:
    """Elements a microbatch in flight holds per token per block. ZB-H1 splits the backward: between
    I and W a block keeps the gradients of its matmul outputs for W, and what recomputation rebuilt for I
    (so checkpointing saves nothing there); counted for every microbatch in flight, an upper bound."""
    if layout.pp == 1 or layout.schedule != "zb-h1" or model.kind == "mlp":
        return block_act_elements(model, layout.tp, layout.ac)
    d, f, tp = model.d_model, model.ffn, layout.tp
    kv = model.kv_heads * (d // model.n_head)
    grad_out = 2 * d + ((3 * d + f) / tp if model.kind == "gpt" else (d + 2 * kv + 2 * f) / tp)
    return block_act_elements(model, tp, "none") + grad_out


def stages_of(model: ModelSpec, layout: Layout) -> list[list[list[int]]]:
    """Per pp rank: its stages (rank r holds stages r, r + pp, ...), each a list of pipeline layers,
    balanced by parameter count as tl.parallelize splits them (pipeline.partition.balance)."""
    n = model.pipeline_layers()
    if layout.pp == 1:
        return [[list(range(n))]]
    parts = layout.pp * layout.virtual_stages
    b = balance(model.layer_params(), parts)
    stages = [list(range(b[i], b[i + 1])) for i in range(parts)]
    return [[stages[s] for s in range(r, parts, layout.pp)] for r in range(layout.pp)]


@functools.lru_cache(maxsize=512)
def schedule_facts(name: str, pp: int, m: int) -> tuple[tuple[tuple[tuple[int, int], ...], ...], float,
                                                        tuple[tuple[int, int], ...]]:
    """(in-flight peaks per rank as ((stage, count), ...), makespan / busy, (actions, messages) per rank)
    of a schedule: built and replayed once per (name, pp, m), however many layouts share it."""
    v = 2 if name == "interleaved" else 1
    if pp * m * v <= SIMULATE_UP_TO:
        sched = build_schedule(name, pp, m, v if v > 1 else None)   # validated and replayed
        sim = sched.simulate()
        stretch = sim["makespan"] / sim["busy_per_rank"]
    else:   # the replay is quadratic in the actions: past a few hundred, the closed form it matches
        sched = SCHEDULES[name](pp, m, v) if v > 1 else SCHEDULES[name](pp, m)
        stretch = 1 + theory_bubble(name, pp, m, v)
    flights = tuple(tuple(sorted(d.items())) for d in _in_flight(sched))
    return flights, stretch, tuple(zip((len(a) for a in sched.actions), _messages(sched)))


def _messages(sched) -> list[int]:
    """Per rank, the point-to-point transfers it takes part in (sends + receives): one per dependency of
    an action on another rank's (an activation forward, a gradient backward). 1F1B's end ranks have one
    per action; interleaved's chunks add a transfer at every chunk boundary, ZB-H1's W has none."""
    last = sched.n_stages - 1
    count = [0] * sched.p
    for r, acts in enumerate(sched.actions):
        for a in acts:
            # the only dependencies that can cross ranks (Schedule.deps, without its per-call index):
            # a forward on the previous stage's, a backward (B or I) on the next stage's backward
            src = a.stage - 1 if a.kind == "F" else a.stage + 1 if a.kind in ("B", "I") else None
            if src is None or src < 0 or src > last or sched.rank_of(src) == r:
                continue
            count[r] += 1
            count[sched.rank_of(src)] += 1
    return count


def in_flight(layout: Layout) -> list[dict[int, int]]:
    """Per pp rank: the most microbatches each of its stages holds activations for at once, from the
    schedule's action order (a forward adds one; its backward, or W for a split backward, frees it)."""
    if layout.pp == 1:
        return [{0: 1}]
    return [dict(r) for r in schedule_facts(layout.schedule, layout.pp, layout.microbatches)[0]]


def _in_flight(sched) -> list[dict[int, int]]:
    out = []
    for acts in sched.actions:
        split = any(a.kind == "W" for a in acts)
        live: dict[int, int] = {}
        peak: dict[int, int] = {}
        for a in acts:
            if a.kind == "F":
                live[a.stage] = live.get(a.stage, 0) + 1
                peak[a.stage] = max(peak.get(a.stage, 0), live[a.stage])
            elif a.kind == ("W" if split else "B"):
                live[a.stage] -= 1
        out.append(peak)
    return out


@dataclass(frozen=True)
class MemoryBreakdown:
    params: float          # local parameters (count)
    states: float          # bytes
    activations: float
    transient: float
    runtime: float

    @property
    def peak(self) -> float:
        return self.states + self.activations + self.transient + self.runtime


def peak_memory(model: ModelSpec, layout: Layout, global_batch: int, runtime_bytes: float = 0.0,
                shm_ranks: int = 1) -> MemoryBreakdown:
    """The largest per-device peak over the pipeline ranks. shm_ranks: how many ranks of the dp group
    share a node's shared-memory transport (1: none; CPU only)."""
    best: MemoryBreakdown | None = None
    ab = act_bytes(layout.precision)
    stage = STAGE[layout.shard]
    per_rank_batch = global_batch // layout.dp
    mb = per_rank_batch // layout.microbatches if layout.pp > 1 else per_rank_batch
    tokens = mb * (model.seq_len if model.kind != "mlp" else 1)
    last = model.pipeline_layers() - 1
    flights = in_flight(layout)
    for rank, stages in enumerate(stages_of(model, layout)):
        layers = [lay for s in stages for lay in s]
        params = sum(local_layer_params(model, lay, layout.tp) for lay in layers) * model.param_scale
        states = params * zero_bytes_per_param(stage, layout.dp, layout.precision)
        acts = 0.0
        for s_index, s_layers in enumerate(stages):
            stage_id = rank + s_index * layout.pp
            n_blocks = sum(1 for lay in s_layers if model.kind == "mlp" or 0 < lay < last)
            per_mb = n_blocks * _held_elements(model, layout) * tokens * ab
            if model.kind != "mlp" and last in s_layers:   # retained logits (log-softmax output), fp32
                per_mb += tokens * model.vocab_size / layout.tp * 4
            if model.kind != "mlp" and 0 in s_layers:
                per_mb += tokens * 2 * model.d_model * ab
            acts += per_mb * flights[rank].get(stage_id, 1)
        transient = _transients(model, layout, layers, tokens, params, ab) + _shm_slots(model, layout, layers,
                                                                                      params, shm_ranks)
        m = MemoryBreakdown(params, states, acts, transient, runtime_bytes)
        if best is None or m.peak > best.peak:
            best = m
    assert best is not None
    return best


def _shm_slots(model: ModelSpec, layout: Layout, layers: list[int], params: float, shm_ranks: int) -> float:
    """ZeRO-2/3 on a shared-memory transport reduce-scatter each bucket in one of WIRE_SLOTS shared
    buffers (trainlib.data_parallel.sharded): a rank writes whole buckets into its own and reads its
    chunk of every peer's, and both count in its RSS. Touched bytes: as much of the slots as the
    buckets fill -- ZeRO-2's 25 MB buckets, ZeRO-3's one per unit -- at most all the gradients."""
    from trainlib.data_parallel.sharded import WIRE_SLOTS

    if shm_ranks <= 1 or STAGE[layout.shard] < 2 or layout.compress != "none":
        return 0.0
    sizes = [local_layer_params(model, lay, layout.tp) * model.param_scale for lay in layers]
    bucket = max(sizes) if layout.shard == "parameters" else BUCKET_BYTES / 4
    own = min(params, WIRE_SLOTS * bucket) * 4             # fp32 gradients (MixedPrecision's reduce_dtype)
    return own * (1 + (shm_ranks - 1) / shm_ranks)


def _transients(model: ModelSpec, layout: Layout, layers: list[int], tokens: int, params: float, ab: int) -> float:
    last = model.pipeline_layers() - 1
    layer_sizes = [local_layer_params(model, lay, layout.tp) * model.param_scale for lay in layers]
    biggest_matrix = max(layer_sizes) if model.kind == "mlp" else max(
        [model.d_model * model.ffn / layout.tp * model.param_scale] +
        [local_layer_params(model, lay, layout.tp) for lay in layers if lay in (0, last)])
    t = biggest_matrix * 4                                  # a fresh gradient before its bucket takes it
    owned = params / layout.dp if STAGE[layout.shard] >= 1 else params
    t += owned * 4                                          # foreach AdamW's parameter-sized temporary
    if model.kind != "mlp" and last in layers:
        t += 2 * tokens * model.vocab_size / layout.tp * 4  # logits' gradient and softmax in backward
    if layout.ac == "full":                                 # one block recomputed in backward
        t += block_act_elements(model, layout.tp, "none") * tokens * ab
    if layout.shard == "parameters":                        # a gathered unit + the prefetched next one
        t += 2 * max(layer_sizes) * (4 if layout.precision == "fp32" else 2)
    if layout.compress != "none":
        t += params * 2                                     # the bf16 copy of the buckets on the wire
    return t
