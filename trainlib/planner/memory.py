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
the gradients of the parameter-owning modules' outputs between a block's I and W (4d + (3d + f)/tp: the
matmuls' and the norms') and what recompute rebuilt, for the microbatches past I only.
A pipeline rank holds the activations of every microbatch it has run forward and not yet backward;
that count comes from the schedule itself (trainlib.pipeline.schedules), not a rule of thumb.
Transients: the backward and the optimizer step peak at different times, so the larger of the two
counts. The backward's: the activations, the largest gradient autograd makes before a bucket hook moves
it, the logits' gradient at the start or later a block's own backward (what checkpointing recomputes and
the gradients beside it: block_backward_elements), ZeRO-3's gathered unit (plus the one prefetched on an
accelerator), and off the shared-memory transport a sharded sync's gradient wires. Without data parallelism
the parameter gradients exist only once the rank's first backward has made them (GRADS in the schedule's
snapshots); ZB-H1's W makes a stage's gradients at once beside the ones it adds them to; a pipeline rank
holds the tensors it has sent so far (SENT). The step's: torch's AdamW temporary (on CPU its per-tensor
loop: 2 x the largest tensor; foreach on accelerators: one parameter-sized buffer).
Held throughout: a CPU node's shm transport pages (a rank's chunk of each peer's buffers, ZeRO-2/3's
reduce slots), a compressed all-reduce's bf16 wire; and the runtime's own bytes (profile). Measured stage
by stage on this machine (RSS, RssShmem; 2026-12-01): see the functions below.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from trainlib.benchmarks.bench_zero import formula as zero_bytes_per_param
from trainlib.config import SyncConfig
from trainlib.data_parallel.buckets import FIRST_BUCKET_MB
from trainlib.data_parallel.sharded import WIRE_SLOTS
from trainlib.pipeline.partition import balance
from trainlib.pipeline.schedules import SCHEDULES, build_schedule, theory_bubble
from .layouts import Layout
from .spec import ModelSpec

SIMULATE_UP_TO = 256   # pp * microbatches * virtual stages replayed exactly; above, (p-1)/m and kin
STAGE = {"none": 0, "optimizer": 1, "gradients": 2, "parameters": 3}
BUCKET_BYTES = SyncConfig().bucket_mb * 2**20   # the bucket `trainlib train` builds (--sync.bucket_mb)
BUCKET0_BYTES = int(FIRST_BUCKET_MB * 2**20)   # and its first, smaller one (data_parallel.buckets)


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


def block_backward_elements(model: ModelSpec, tp: int, ac: str) -> float:
    """Elements per token a block's backward makes beside the saved activations, at its peak: what checkpointing
    recomputes plus the gradients of the block's widest outputs. Measured here (per-block RSS at a 4 KiB pin,
    the default GPT, 2026-12-02 09:3x, /tmp/exp/trace_tp.py, not kept; d units): none 4.2 / 2.0 at tp = 1 / 2
    (the MLP's hidden gradient, f / tp), selective 11.2 / 6.2 (d + 2.5 f / tp: the recomputed norms and GELU
    beside it), full 20 / 11.1 (the whole "none" set rebuilt, plus f / tp). Llama blocks: the same rule on their
    own sets (not measured)."""
    d, f = model.d_model, model.ffn
    if model.kind == "mlp":
        return block_act_elements(model, tp, "none") if ac == "full" else 0.0
    grads = f / tp
    if ac == "full":
        return block_act_elements(model, tp, "none") + grads
    if ac == "selective":
        return d + 1.5 * f / tp + grads
    return grads


def _after_input_grad_elements(model: ModelSpec, layout: Layout) -> float:
    """Elements per token per block a microbatch holds between ZB-H1's I and W: the saved activations without
    checkpointing (I's recomputation rebuilt them and the retained graph keeps them) and the gradient of every
    parameter-owning module's output, captured for W (zero_bubble.SplitBackward: the matmuls' outputs and the
    two norms'). Measured here (per-action RSS at a 4 KiB pin, 192-wide GPT, 256 tokens a microbatch): I adds
    ~4.8 MiB a microbatch on the last stage, 12.7 d per block with the final norm's and the logits' gradients."""
    d, f, tp = model.d_model, model.ffn, layout.tp
    kv = model.kv_heads * (d // model.n_head)
    grad_out = 4 * d + ((3 * d + f) / tp if model.kind == "gpt" else (d + 2 * kv + 2 * f) / tp)
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
def schedule_facts(name: str, pp: int, m: int) -> tuple[tuple, float, tuple[tuple[int, int], ...], tuple[int, ...]]:
    """(in-flight snapshots per rank, each (((stage, phase), count), ...) (in_flight), makespan / busy,
    (actions, messages) per rank, tensors sent per rank)
    of a schedule: built and replayed once per (name, pp, m), however many layouts share it."""
    v = 2 if name == "interleaved" else 1
    if pp * m * v <= SIMULATE_UP_TO:
        sched = build_schedule(name, pp, m, v if v > 1 else None)   # validated and replayed
        sim = sched.simulate()
        stretch = sim["makespan"] / sim["busy_per_rank"]
    else:   # the replay is quadratic in the actions: past a few hundred, the closed form it matches
        sched = SCHEDULES[name](pp, m, v) if v > 1 else SCHEDULES[name](pp, m)
        stretch = 1 + theory_bubble(name, pp, m, v)
    flights = tuple(tuple(tuple(sorted(d.items())) for d in r) for r in _in_flight(sched))
    return flights, stretch, tuple(zip((len(a) for a in sched.actions), _messages(sched))), tuple(_sends(sched))


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


def in_flight(layout: Layout) -> list[list[dict[tuple[int, int], int]]]:
    """Per pp rank: the microbatches each of its stages holds activations for, keyed (stage, phase), at every
    moment the rank could peak (just after a forward or a split backward's I, during a W, when its gradients
    first exist, at the step's end), from the schedule's action order (a forward adds one; its backward frees
    it; a split backward's I moves it to INPUT_GRAD_DONE, where it also holds the gradients W needs, and W
    frees it), with GRADS (the rank's gradients made) and SENT (its tensors sent so far) beside. An
    interleaved rank's two stages do not peak at once: counting each at its own peak over-predicted the
    2-stage, m=4 pipelines here by 22-26%."""
    if layout.pp == 1:
        return [[{(0, FORWARDED): 1}]]
    return [[dict(snap) for snap in r] for r in schedule_facts(layout.schedule, layout.pp, layout.microbatches)[0]]


FORWARDED, INPUT_GRAD_DONE = 0, 1   # a microbatch in flight: forwarded; or past a split backward's I, before W
GRADS = (-1, 0)   # a snapshot's key once the rank's parameter gradients exist (after its first B, or W when split)
SENT = (-2, 0)    # a snapshot's key: the tensors the rank has sent so far (kept until the step ends)


def _in_flight(sched) -> list[list[dict[tuple[int, int], int]]]:
    out = []
    last = sched.n_stages - 1
    for acts in sched.actions:
        split = any(a.kind == "W" for a in acts)
        live: dict[tuple[int, int], int] = {}
        snaps: list[dict[tuple[int, int], int]] = []
        for a in acts:
            fwd, held = (a.stage, FORWARDED), (a.stage, INPUT_GRAD_DONE)
            if a.kind == "F":
                live[fwd] = live.get(fwd, 0) + 1
            elif a.kind == "I":     # the microbatch now also holds its captured gradients, until W
                live[fwd] -= 1
                live[held] = live.get(held, 0) + 1
            elif a.kind == "W":
                # W's gradients of the whole stage come at once (one autograd.grad) and are then added (or on
                # the first W cloned) into .grad: two stage-sized sets while this microbatch still holds its own
                _keep_snapshot(snaps, live, grads=2)
                live[held] -= 1
            elif a.kind == "B" and not split:
                live[fwd] -= 1
            if _sends_tensor(a, last):
                live[SENT] = live.get(SENT, 0) + 1
            if a.kind in ("B", "W") and GRADS not in live:   # the rank's gradients exist from now on
                live[GRADS] = 1
                _keep_snapshot(snaps, live)
            if a.kind in ("F", "I"):    # the moments the rank's held activations grow
                _keep_snapshot(snaps, live)
        _keep_snapshot(snaps, live)   # the step's end: every send still kept
        out.append(snaps)
    return out


def _keep_snapshot(snaps: list[dict], live: dict, grads: int | None = None) -> None:
    """Add live's nonzero counts as a snapshot (its GRADS count replaced by grads if given) unless another holds
    at least as much in every key; drop the ones it holds as much as."""
    snap = {k: c for k, c in live.items() if c}
    if grads is not None:
        snap[GRADS] = grads
    if not any(all(o.get(k, 0) >= c for k, c in snap.items()) for o in snaps):
        snaps[:] = [o for o in snaps if not all(snap.get(k, 0) >= c for k, c in o.items())] + [snap]


def _sends_tensor(a, last: int) -> bool:
    """Whether action a sends a tensor: a forward's activation but the last stage's, a backward's (or I's)
    input gradient but stage 0's."""
    return (a.kind == "F" and a.stage < last) or (a.kind in ("B", "I") and a.stage > 0)


def _sends(sched) -> list[int]:
    """Per rank, the tensors it sends (an activation per forward but the last stage's, a gradient per
    backward or I but stage 0's): the pipeline keeps each until the step ends (runtime's state.keep)."""
    last = sched.n_stages - 1
    return [sum(1 for a in acts if _sends_tensor(a, last)) for acts in sched.actions]


@dataclass(frozen=True)
class MemoryBreakdown:
    params: float          # local parameters (count)
    states: float          # bytes
    activations: float
    transient: float       # held buffers + the larger of (backward's transients, the optimizer's) net of activations
    runtime: float

    @property
    def peak(self) -> float:
        return self.states + self.activations + self.transient + self.runtime


def peak_memory(model: ModelSpec, layout: Layout, global_batch: int, runtime_bytes: float = 0.0,
                shm_ranks: int = 1, accelerator: bool = False) -> MemoryBreakdown:
    """The largest per-device peak over the pipeline ranks. shm_ranks: how many ranks of the dp group
    share a node's shared-memory transport (1: none; CPU only); accelerator: a GPU/Neuron device, where
    torch's optimizer takes its foreach path and the collectives run on a stream of their own."""
    return max(rank_memory(model, layout, global_batch, runtime_bytes, shm_ranks, accelerator),
               key=lambda m: m.peak)


def rank_memory(model: ModelSpec, layout: Layout, global_batch: int, runtime_bytes: float = 0.0,
                shm_ranks: int = 1, accelerator: bool = False) -> list[MemoryBreakdown]:
    """Each pipeline rank's peak (peak_memory's arguments), in pp rank order."""
    out: list[MemoryBreakdown] = []
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
        per_mb: dict[tuple[int, int], float] = {}   # (stage, phase) -> bytes a microbatch in flight holds
        for s_index, s_layers in enumerate(stages):
            n_blocks = sum(1 for lay in s_layers if model.kind == "mlp" or 0 < lay < last)
            b = n_blocks * block_act_elements(model, layout.tp, layout.ac) * tokens * ab
            if model.kind != "mlp" and last in s_layers:   # retained logits (log-softmax output), fp32
                b += tokens * model.vocab_size / layout.tp * 4
            if model.kind != "mlp" and 0 in s_layers:
                b += tokens * 2 * model.d_model * ab
            s_id = rank + s_index * layout.pp
            per_mb[(s_id, FORWARDED)] = b
            if layout.schedule == "zb-h1" and layout.pp > 1:
                after = b      # an MLP's blocks: counted as before (2 d, their Linear outputs' gradients in it)
                if model.kind != "mlp":
                    after += n_blocks * (_after_input_grad_elements(model, layout)
                                         - block_act_elements(model, layout.tp, layout.ac)) * tokens * ab
                    if last in s_layers:   # and the final norm's and the logits' captured gradients
                        after += tokens * (model.d_model * ab + model.vocab_size / layout.tp * 4)
                per_mb[(s_id, INPUT_GRAD_DONE)] = after
        per_mb[GRADS] = 0.0
        # the pipeline's sent buffers: an activation or a gradient per send, kept until the step ends (received
        # ones are the next stage's input, counted with its activations, or a gradient used once). Those sent
        # by the moment of the peak count: all of a step's, as before, read interleaved pp=2 m=2 1.2-2.7 MiB
        # over (6 sends, 4 of them by its peak). Measured here per action at a 4 KiB pin: the 192-wide GPT's
        # 1F1B m=8 grows 0.1 MiB, one 128-token microbatch's activation, per forward-backward pair
        per_mb[SENT] = tokens * model.d_model * ab
        acts = max(sum(per_mb[k] * c for k, c in snap.items() if k not in (GRADS, SENT)) for snap in flights[rank])
        # Without data parallelism nothing holds the gradients before the backward makes them (a data-parallel
        # wrapper's buckets hold them from the build on): a snapshot before the rank's first backward lacks all
        # but the first ones made (the rank's last layer's). Measured here (2026-12-02): the tp = 2 GPT peaked
        # 1.7 MiB, its gradients, under the count with them; so did GPipe and 1F1B at m = pp on the 192-wide.
        made_late = 0.0
        if layout.dp == 1:
            made_late = (params - local_layer_params(model, stages[-1][-1], layout.tp) * model.param_scale) * 4

        def grads_beyond_states(snap: dict) -> float:   # the states count one set of gradients
            return (snap[GRADS] - 1) * params * 4 if GRADS in snap else -made_late

        backward = max(sum(per_mb[k] * c for k, c in snap.items()) + grads_beyond_states(snap)
                       for snap in flights[rank])
        # the backward (activations and its transients) and the optimizer step (its temporary; the
        # activations are gone by then) peak at different times: the larger counts, on top of the
        # buffers held throughout (the transport's shared pages; a compressed all-reduce's bf16 wire)
        owned = params / layout.dp if stage >= 1 else params
        phase = max(backward + _backward_transients(model, layout, layers, tokens, ab, shm_ranks > 1, accelerator),
                    _optimizer_temporary(model, layout, layers, owned, accelerator))
        held = _shm_pages(model, layout, layers, params, shm_ranks)
        if layout.compress != "none" and stage == 0:
            held += params * 2                  # the bf16 wire buffers, kept between steps
        out.append(MemoryBreakdown(params, states, acts, held + phase - acts, runtime_bytes))
    return out


@functools.lru_cache(maxsize=4096)
def layer_tensors(model: ModelSpec, layer: int, tp: int) -> tuple[float, ...]:
    """Element counts of pipeline layer `layer`'s parameter tensors on one tp rank, in registration order:
    its matrices exactly, its norms and biases together as one last tensor (they are small)."""
    d, f, v = model.d_model, model.ffn, model.vocab_size
    last = model.pipeline_layers() - 1
    if model.kind == "mlp":
        mats = [float(d * d)]
    elif layer == 0:
        mats = [v * d / tp] + ([float(model.seq_len * d)] if model.kind == "gpt" else [])
    elif layer == last:
        mats = [] if model.kind == "llama" and model.tied else [d * v / tp]
    elif model.kind == "gpt":   # qkv, attention projection, fc, MLP projection
        mats = [3 * d * d / tp, d * d / tp, d * f / tp, f * d / tp]
    else:                       # q, k, v, o, gate, up, down
        kv = model.kv_heads * (d // model.n_head)
        mats = [d * d / tp, d * kv / tp, d * kv / tp, d * d / tp, d * f / tp, d * f / tp, f * d / tp]
    rest = local_layer_params(model, layer, tp) - sum(mats)
    return tuple(x * model.param_scale for x in (*mats, *([rest] if rest > 0 else [])))


def _biggest_tensor(model: ModelSpec, layers: list[int], tp: int) -> float:
    return max(max(layer_tensors(model, lay, tp)) for lay in layers)


def largest_bucket_bytes(model: ModelSpec, layout: Layout, layers: list[int]) -> float:
    """Bytes of the largest fp32 gradient bucket of these layers (bucket_bytes)."""
    return max(bucket_bytes(model, layout, layers))


def bucket_bytes(model: ModelSpec, layout: Layout, layers: list[int]) -> tuple[float, ...]:
    """Bytes of each fp32 gradient bucket of these layers as trainlib.data_parallel.buckets.plan_buckets
    makes them (backward order, a 1 MiB first bucket, then --sync.bucket_mb; a tensor larger than
    the cap is a bucket alone): planned on meta tensors of the layers' shapes. ZeRO-3: one per layer."""
    if layout.shard == "parameters":
        return tuple(local_layer_params(model, lay, layout.tp) * model.param_scale * 4 for lay in layers)
    return _buckets(model, layout.tp, tuple(layers))


@functools.lru_cache(maxsize=1024)
def _buckets(model: ModelSpec, tp: int, layers: tuple[int, ...]) -> tuple[float, ...]:
    import torch

    from trainlib.data_parallel.buckets import plan_buckets

    named = [(f"{lay}.{i}", torch.nn.Parameter(torch.empty(max(1, round(n)), device="meta")))
             for lay in layers for i, n in enumerate(layer_tensors(model, lay, tp))]
    return tuple(sum(p.numel() for _, p in b) * 4.0 for b in plan_buckets(named, SyncConfig().bucket_mb))


def _shm_pages(model: ModelSpec, layout: Layout, layers: list[int], params: float, shm_ranks: int) -> float:
    """Pages of a CPU node's shared-memory transport (trainlib.sync.shm) in a rank's RSS beyond its own
    states: with n ranks on it, a rank reduces its 1/n chunk of every peer's buffer in place, so it
    touches (n-1)/n of a buffer's bytes in the peers'. Plain all-reduce: the gradient buckets'; ZeRO-1:
    the gradients' (reduce-scatter) and the parameters' (all-gather); ZeRO-2/3: the parameters' and
    WIRE_SLOTS reduce slots of the largest bucket each (trainlib.data_parallel.sharded), its own zeroed
    whole when allocated, the peers' as far as the gradients reach. Measured here (RssShmem, dp=2): the
    wide MLP (48 MiB of fp32 parameters) 72 / 144 / 120 / 96 MiB for plain / ZeRO-1 / -2 / -3, 1.5 M /
    3 M / (M + M/2 + 2 x 16 MiB + 16 MiB / 2) / (M/2 + M/2 + 2 x 16 + 16 / 2) with the own buffers."""
    if shm_ranks <= 1 or layout.compress != "none":
        return 0.0
    m = params * 4                              # fp32 (MixedPrecision's reduce_dtype; fp32 master weights)
    peer = (shm_ranks - 1) / shm_ranks
    stage = STAGE[layout.shard]
    if stage <= 1:
        return (1 + stage) * m * peer
    slot = largest_bucket_bytes(model, layout, layers)
    return WIRE_SLOTS * slot + min(m, WIRE_SLOTS * slot) * peer + m * peer


def _optimizer_temporary(model: ModelSpec, layout: Layout, layers: list[int], owned: float,
                         foreach: bool) -> float:
    """torch's AdamW step beside the states: on CPU its single-tensor loop (torch picks foreach only for
    accelerators) makes sqrt(v) and its quotient for one tensor at a time, 2 x the largest owned tensor (measured
    here: +32 MiB for the wide MLP's 16 MiB matrices, +1.1 MiB for the 192-wide GPT's 0.56 MiB ones); foreach
    keeps sqrt(v) for all of them: one parameter-sized buffer."""
    if foreach:
        return owned * 4
    return 2 * min(_biggest_tensor(model, layers, layout.tp), owned) * 4


def _backward_transients(model: ModelSpec, layout: Layout, layers: list[int], tokens: int, ab: int,
                         shm: bool, accelerator: bool) -> float:
    """Beside the activations in backward: the largest gradient autograd makes before a bucket hook moves it,
    the logits' gradient and softmax, the block being recomputed (full checkpointing), ZeRO-3's gathered
    unit and the one prefetched, the sharded sync's gradient wires off the shared-memory transport."""
    last = model.pipeline_layers() - 1
    layer_sizes = [local_layer_params(model, lay, layout.tp) * model.param_scale for lay in layers]
    t = _biggest_tensor(model, layers, layout.tp) * 4
    # the logits' gradient and softmax at the backward's start, or a block's own backward later, once the
    # retained logits are gone: not both at once (per-block traces here, 2026-12-02: the peak of the tp = 2
    # GPT is at the start without checkpointing, in its last block's backward with)
    logits = tokens * model.vocab_size / layout.tp * 4 if model.kind != "mlp" and last in layers else 0.0
    has_blocks = any(model.kind == "mlp" or 0 < lay < last for lay in layers)
    # a split backward's I keeps what it recomputed until W (counted with the microbatch past I): only the
    # gradients beside it are new
    split = layout.schedule == "zb-h1" and layout.pp > 1
    block = (block_backward_elements(model, layout.tp, "none" if split else layout.ac) * tokens * ab
             if has_blocks else 0.0)
    t += max(2 * logits, block - logits)
    if layout.shard == "parameters":
        # the unit gathered for its backward; on an accelerator the next one prefetched beside it on a stream
        # of its own (assumed). On CPU the gather runs in turn: the wide MLP's ZeRO-3 peaks here read one
        # 16 MiB unit, not two (16-19 MiB under the two-unit count, 2026-12-02 plan-memory.json)
        t += (2 if accelerator else 1) * max(layer_sizes) * (4 if layout.precision == "fp32" else 2)
    if STAGE[layout.shard] >= 2 and not shm:
        # off the shared-memory transport each bucket's reduce-scatter takes a wire of its own (bf16 when
        # compressed). gloo's run behind the backward on CPU cores the backward also needs: up to all the
        # gradients wait at once (measured here: ZeRO-2 across the emulated nodes ~M over the model
        # without); on an accelerator's own stream, assumed: the bucket reducing and the one filling
        wire = 2 if layout.compress != "none" else 4
        waiting = sum(layer_sizes)
        if accelerator:
            waiting = min(waiting, WIRE_SLOTS * largest_bucket_bytes(model, layout, layers) / 4)
        t += waiting * wire
    return t
