"""`trainlib plan --calibrate`: measure this machine's profile on 2 local ranks (about two minutes).

Each figure is taken the way training uses it, with both ranks busy at once (OMP_NUM_THREADS =
cores / 2, as `trainlib train` sets it): matmul FLOP/s per dtype on the shapes of GPT blocks (d 128 to
512, 16 and 2048 rows), memcpy bandwidth, the cost of one tiny op, the gloo all-reduce (TP, PP, compressed
and ZeRO-2/3 gradients) and shared-memory all-reduce (whole fp32 buckets) as alpha-beta fits over
64 KiB..8 MiB (the shm one also at 64 MiB: past the caches), reduce-scatter + all-gather over all-reduce at
8 and 64 MiB, a few-row matmul streaming a 16 MiB weight, the pipeline runtime's cost per
action (tiny layers, 1F1B, m = 8) and the colocated parameter server's cost per message and per byte
(gradient syncs of 4 MiB in one partition, 16 MiB in 4 and in 16). Inter-node efficiency is not measurable without a second
node: it comes from `trainlib bench cluster` (benchmarks/results/cluster.json) when present.
The load average is recorded with the profile: a calibration is only as good as its conditions.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import time

import torch

from .layouts import Layout
from .profile import Profile

SIZES = (64 * 1024, 1 << 20, 8 << 20)   # in the caches (timing.SYNC_CACHE_BYTES is the largest)
DRAM_SIZE = 64 << 20                    # past them


def _median_time(fn, reps: int, inner: int = 1) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        ts.append((time.perf_counter() - t0) / inner)
    return statistics.median(ts)


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares t = a + b * x; returns (a, b) with both clamped >= 0."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(t for _, t in points) / n
    b = sum((x - mx) * (t - my) for x, t in points) / max(1e-30, sum((x - mx) ** 2 for x, _ in points))
    b = max(b, 1e-15)
    return max(0.0, my - b * mx), b


WIDTHS = (96, 128, 256, 512)


def _matmul(dtype: torch.dtype) -> tuple[float, float, float]:
    """(peak FLOP/s, half-rate rows, half-rate width): rate(r, d) = peak * r / (r + h) * d / (d + w), fitted
    to GPT-block shapes (r x d) @ (d x 4d): 1/rate is linear in 1/r at the median width, and in 1/d at
    2048 rows (small widths fill the vector units and caches worse: d 96 runs well below d 512 here)."""
    rate: dict[tuple[int, int], float] = {}
    for rows in (16, 2048):
        for d in WIDTHS:
            a, w = torch.randn(rows, d, dtype=dtype), torch.randn(d, 4 * d, dtype=dtype)
            a @ w
            t0 = time.perf_counter()
            a @ w
            # a dtype the CPU emulates (bf16 without AVX512-BF16: ~1e9 FLOP/s, seconds a call at 2048 x 512)
            # gets fewer calls: the whole calibration took ~5 minutes on such a host, mostly here
            slow = time.perf_counter() - t0 > 0.05
            t = _median_time(lambda: a @ w, 3 if slow else 5, 1 if slow else max(3, 6144 // rows))
            rate[rows, d] = 2 * rows * d * 4 * d / t
    inv = {rows: 1 / statistics.median(rate[rows, d] for d in WIDTHS) for rows in (16, 2048)}
    slope = max(0.0, (inv[16] - inv[2048]) / (1 / 16 - 1 / 2048))
    # 1/rate(2048, d) = 1/P + w / (P d): least squares in x = 1/d
    a, b = _fit([(1 / d, 1 / rate[2048, d]) for d in WIDTHS])
    peak_wide = 1 / max(1e-30, a)                   # at 2048 rows, infinitely wide
    peak = 1 / max(1e-30, 1 / peak_wide - slope / 2048)
    return peak, slope * peak, b * peak_wide


def _weight_stream(dtype: torch.dtype = torch.float32, d: int = 2048, rows: int = 8) -> float:
    """Bytes/s at which a few-row matmul streams a weight past the caches (d x d: 16 MiB in fp32): the
    median of its forward (x W^T), input-gradient (dy W) and weight-gradient (dy^T x) calls."""
    w, x, dy = torch.randn(d, d, dtype=dtype), torch.randn(rows, d, dtype=dtype), torch.randn(rows, d, dtype=dtype)
    calls = (lambda: x @ w.t(), lambda: dy @ w, lambda: dy.t() @ x)
    t = statistics.median(_median_time(c, 7) for c in calls)
    return w.numel() * w.element_size() / t


def memory_sounding():
    """A function reps -> memory bandwidth (bytes read + written / s: the median copy_ of 256 MiB, past any
    cache), its tensors allocated once: mem_Bps, and how a validation re-sounds the host's memory speed."""
    src, dst = torch.randn(64 << 20), torch.empty(64 << 20)
    dst.copy_(src)
    return lambda reps: 2 * src.numel() * 4 / _median_time(lambda: dst.copy_(src), reps)


def _op_cost() -> float:
    """A forward op with its backward: a chain of 64 tiny Linear layers, forward + backward, per layer."""
    torch.manual_seed(0)
    layers = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(64)])
    x = torch.randn(2, 4)

    def fwd_bwd():
        layers(x).sum().backward()

    fwd_bwd()
    return _median_time(fwd_bwd, 7, 3) / 64


def _grad_call() -> float:
    """What ZB-H1's split backward costs per parameter-owning module beyond one plain backward: a stage of
    16 tiny Linear + Tanh layers, forward recorded, I then W (trainlib.pipeline.zero_bubble: W makes one
    autograd call per module) minus forward + backward, per module."""
    from trainlib.pipeline.zero_bubble import SplitBackward

    k = 16
    torch.manual_seed(0)
    stage = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh()) for _ in range(k)])
    split, x0 = SplitBackward(stage), torch.randn(4, 16)

    def plain():
        stage(x0.clone().requires_grad_()).sum().backward()

    def split_step():
        x = x0.clone().requires_grad_()
        with split.record() as rec:
            y = stage(x)
        g = torch.ones_like(y)
        _, captured = SplitBackward.input_grad(x, y, g, rec)
        split.weight_grad(y, g, rec, captured)

    plain(), split_step()
    return max(0.0, _median_time(split_step, 7, 5) - _median_time(plain, 7, 5)) / k


def _sync_point_cost() -> float:
    """What one tiny all-reduce costs between two pieces of compute, as TP and pipeline steps meet it:
    back-to-back collectives keep both processes running, but in a step a rank that arrives first sleeps
    and must be scheduled again (on a loaded machine, a scheduler slice). Loop of (2 ms of matmul, 4-byte
    all-reduce) minus the same loop without the all-reduce."""
    from trainlib import comm

    a, w = torch.randn(256, 256), torch.randn(256, 256)
    reps = max(1, int(2e-3 / _median_time(lambda: a @ w, 5, 5)))
    tiny = torch.zeros(1)

    def work():
        for _ in range(reps):
            a @ w

    def work_sync():
        work()
        comm.all_reduce(tiny)

    comm.barrier()
    t_sync = _median_time(work_sync, 5, 10)
    comm.barrier()
    t_work = _median_time(work, 5, 10)
    return max(0.0, t_sync - t_work)


def _collectives() -> dict[str, float]:
    import torch.distributed as dist

    from trainlib import comm, runtime
    from trainlib.sync import shm

    group, timeout_s = dist.group.WORLD, runtime.get_runtime().timeout_s
    flats = {s: torch.zeros(s // 4) for s in SIZES}
    gloo = []
    for s in SIZES:
        comm.barrier()
        gloo.append((s, _median_time(lambda: comm.all_reduce(flats[s]), 5, 3)))
    out = {}
    a, b = _fit(gloo)
    out["intra_Bps"] = 1 / b                                           # n = 2: t = 2 alpha + M / B
    out["intra_alpha_s"] = _sync_point_cost() / 2
    halves = {s: torch.zeros(s // 2, dtype=torch.bfloat16) for s in SIZES}   # the same bytes in bf16
    pts16 = []
    for s in SIZES:
        comm.barrier()
        pts16.append((s, _median_time(lambda: comm.all_reduce(halves[s]), 5, 3)))
    a16, b16 = _fit(pts16)
    out["compress_alpha_s"], out["compress_Bps"] = a16 / 2, 1 / b16
    try:
        g = shm.ShmGroup(group, timeout_s)
        sizes = (*SIZES, DRAM_SIZE)
        for i, s in enumerate(sizes):
            g.alloc(i, s // 4, torch.float32)
        g.map_peers()
        pts = []
        for i, s in enumerate(sizes):
            comm.barrier()
            pts.append((s, _median_time(lambda: g.allreduce(i), 5, 3)))
        # ZeRO's sync on this transport: reduce-scatter + all-gather of the same buffers in place
        ratios = []
        for i in (len(SIZES) - 1, len(SIZES)):
            comm.barrier()
            rs_ag = _median_time(lambda: (g.reduce_scatter(i), g.all_gather(i)), 5, 3)
            ratios.append(rs_ag / pts[i][1])
        g.close()
        a, b = _fit(pts[:len(SIZES)])
        out["sync_alpha_s"], out["sync_Bps"] = a / 2, 1 / b
        # past the caches: the slope from the largest in-cache size to DRAM_SIZE
        out["sync_dram_Bps"] = (DRAM_SIZE - SIZES[-1]) / max(1e-9, pts[-1][1] - pts[-2][1])
        out["sync_rs_ag_over_ar"] = statistics.mean(ratios)
    except Exception:   # no /dev/shm room: the dp sync falls back to gloo, and so does the profile
        out["sync_alpha_s"], out["sync_Bps"] = out["intra_alpha_s"], out["intra_Bps"]
        out["sync_dram_Bps"] = 0.0
    out["rs_ag_over_ar"] = statistics.mean((_rs_ag_over_ar(flats[SIZES[-1]]), _rs_ag_over_ar(torch.zeros(DRAM_SIZE // 4))))
    out.setdefault("sync_rs_ag_over_ar", out["rs_ag_over_ar"])   # the fallback above: gloo's
    return out


def _rs_ag_over_ar(big: torch.Tensor) -> float:
    """gloo reduce-scatter + all-gather of a tensor over its all-reduce (ZeRO's sync against DDP's)."""
    from trainlib import comm

    half = torch.zeros(big.numel() // 2)

    def rs_ag():
        comm.reduce_scatter_tensor(half, big)
        comm.all_gather_into_tensor(big, half)

    comm.barrier()
    ar = _median_time(lambda: comm.all_reduce(big), 5)
    comm.barrier()
    return _median_time(rs_ag, 5) / ar


def _pipeline_action() -> float:
    import torch.nn as nn

    import trainlib as tl
    from trainlib.pipeline import Pipeline

    mesh = tl.Mesh(pp=2, dp=1, tp=1)
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(2)]
    pipe = Pipeline(layers, mesh, schedule="1f1b", microbatches=8, loss_fn=nn.functional.mse_loss,
                    boundaries=[0, 1, 2])
    x, y = torch.randn(32, 16), torch.randn(32, 16)
    for _ in range(3):
        pipe.step(x, y)
    t = _median_time(lambda: pipe.step(x, y), 7)
    pipe.close() if hasattr(pipe, "close") else None
    return t / len(pipe.schedule.actions[mesh.rank("pp")])


PS_PROBES = ((4, 4.0), (16, 4.0), (16, 1.0))   # (MiB synced, partition MiB): 1, 4 and 16 messages


def fit_parameter_server(points: list[tuple[float, int, float]]) -> tuple[float, float, float]:
    """(fixed seconds per sync, seconds per partition message, bytes/s) from syncs given as (bytes, messages,
    seconds): t = a + msgs x c + 2M / B (both workers' pushes go through the one server). Two syncs of the
    same bytes in different partition sizes separate the per-message cost from the per-byte one."""
    (m1, n1, t1), (m2, n2, t2), (m3, n3, t3) = points
    if m2 != m3 or n2 == n3 or m1 == m2:
        raise ValueError(f"parameter server probes {points}: need two of the same bytes in different partitions")
    c = max(0.0, (t3 - t2) / (n3 - n2))
    per_byte = max(1e-15, ((t2 - t1) - c * (n2 - n1)) / (2 * (m2 - m1)))
    a = max(0.0, t1 - c * n1 - 2 * m1 * per_byte)
    return a, c, 1 / per_byte


def _parameter_server() -> tuple[float, float, float]:
    """fit_parameter_server on the colocated PS for 2 workers: each probe's sync time is its step minus
    the same backward without a sync."""
    import torch.nn as nn

    import trainlib as tl

    pts = []
    for mib, part_mib in PS_PROBES:
        n_floats = mib << 18
        torch.manual_seed(0)
        plain = nn.Linear(1024, n_floats // 1024, bias=False)
        torch.manual_seed(0)
        ps = tl.DataParallel(nn.Linear(1024, n_floats // 1024, bias=False),
                             sync=tl.ParameterServer(timeout_s=120, partition_mb=part_mib))
        x = torch.randn(2, 1024)

        def step(m):
            m.zero_grad(set_to_none=True)
            m(x).sum().backward()

        for _ in range(2):
            step(plain), step(ps)
        t_plain = _median_time(lambda: step(plain), 5)
        t_ps = _median_time(lambda: step(ps), 5)
        pts.append((n_floats * 4, math.ceil(mib / part_mib), max(1e-6, t_ps - t_plain)))
        ps.close()
    return fit_parameter_server(pts)


def _rank_measure() -> dict:
    from trainlib import comm

    out: dict = {}
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    comm.barrier()
    out["matmul_fp32_flops"], out["matmul_half_rows"], out["matmul_half_width"] = _matmul(torch.float32)
    comm.barrier()
    out["matmul_bf16_flops"], _, _ = _matmul(torch.bfloat16)
    comm.barrier()
    out["matmul_weight_Bps"] = _weight_stream()
    comm.barrier()
    out["mem_Bps"] = memory_sounding()(7)
    out["op_s"] = _op_cost()
    out["grad_call_s"] = _grad_call()
    out.update(_collectives())
    out["pp_action_s"] = max(0.0, _pipeline_action() - out["intra_alpha_s"])
    out["ps_sync_s"], out["ps_msg_s"], out["ps_Bps"] = _parameter_server()
    comm.barrier()
    out["probe_s"] = _probe_step()
    out["probe_wide_s"] = _median_time(probe_step_fn(shape=WIDE_PROBE), 7, 2)
    out.update(_feature_probes())
    return out


MEMORY_PROBE_REPS = 3   # the memory probe's measurements after its unmeasured first build (the median)


def _memory_probe() -> float:
    """Peak RSS of the probe GPT at dp=2 (as `trainlib train` builds it) over the RSS before it was built,
    two steps, largest rank: what the memory model misses of it is the runtime's own bytes per device
    (gloo and transport buffers, allocator slack). Run in processes of its own (calibrate spawns them after
    the other measurements) and pins glibc's mmap threshold so freed tensors leave RSS, as the validation
    measures (benchmarks/bench_plan.py); builds it once unmeasured (as the validation warms each feature up:
    a first build pays one-time costs no later one does) and takes the median of MEMORY_PROBE_REPS.
    (Measured last in the calibration's own processes it read 3.9-4.5 MiB over the model in three
    calibrations, 2026-12-02 at the 4 KiB pin, and the validation's layouts 2.5 MiB under their predictions at
    the median; in fresh processes 0.1 MiB, and the probe at twice the tokens, width or vocabulary within
    0.2 MiB of the model.)"""
    import ctypes
    import gc

    import torch.distributed as dist

    from trainlib import comm
    from trainlib.benchmarks.dp_workloads import MEASURE_PIN_BYTES, fix_malloc_threshold, reset_peak_rss, status_kb

    fix_malloc_threshold(MEASURE_PIN_BYTES)
    libc = ctypes.CDLL("libc.so.6")
    peaks = []
    for rep in range(1 + MEMORY_PROBE_REPS):
        gc.collect()
        libc.malloc_trim(0)
        comm.barrier()
        base_kb = status_kb("VmRSS")
        reset_peak_rss()
        step, close = _build_layout_probe(Layout(1, dist.get_world_size(), 1))
        for _ in range(2):
            step()
        close()
        del step, close
        peak = torch.tensor([(status_kb("VmHWM") - base_kb) * 1024.0], dtype=torch.float64)
        comm.all_reduce(peak, op="max")
        if rep:
            peaks.append(float(peak))
    return statistics.median(peaks)


def _feature_probes() -> dict[str, float]:
    """The probe GPT under the features whose cost is not a FLOP or a byte: checkpointing (each rank on its
    own), a rank alone (the other waits at a barrier, as in a pipeline bubble), ZeRO-1 vs ZeRO-3 at dp=2 and
    tp=2, each as `trainlib train` builds it. calibrate() turns them into the profile's feature costs."""
    import torch.distributed as dist

    from trainlib import comm

    out = {}
    # checkpointing's cost is a difference of two step times: each is timed in turn with a plain probe,
    # plain full selective x 3, so that a host that speeds up or slows down meanwhile moves them alike (a
    # plain probe timed once, apart from the others, read 13.3 ms against a full one timed later at 23.0:
    # a recompute costing 2.6 forwards)
    steps = {ac: probe_step_fn(ac) for ac in ("none", "full", "selective")}
    # and in CKPT_MICRO microbatches: full checkpointing pays per checkpointed call, not only per FLOP
    steps.update({f"{ac}_m": probe_step_fn(ac, micro=CKPT_MICRO) for ac in ("none", "full")})
    rounds: dict[str, list[float]] = {ac: [] for ac in steps}
    for _ in range(CKPT_ROUNDS):
        for ac, fn in steps.items():
            comm.barrier()
            rounds[ac].append(_median_time(fn, 5, 2))
    out["probe_plain_s"] = statistics.median(rounds["none"])
    for ac in ("full", "selective"):
        out[f"probe_{ac}_s"] = statistics.median(rounds[ac])
    out["probe_plain_micro_s"] = statistics.median(rounds["none_m"])
    out["probe_full_micro_s"] = statistics.median(rounds["full_m"])
    step, solo = probe_step_fn(), []
    for r in range(dist.get_world_size()):
        comm.barrier()
        if dist.get_rank() == r:
            solo.append(_median_time(step, 5, 2))
        comm.barrier()
    out["probe_solo_s"] = solo[0]
    # the feature costs are differences of these (ZeRO-3 - ZeRO-1 is a few ms): each layout is timed
    # FEATURE_ROUNDS times, in the order A B C A B C ..., so a host that speeds up or slows down over the
    # probes moves them alike, and the median of each is taken (a slow spell in one round moves no fit).
    # tp=2's base is the plain probe timed in the same rounds ("tp2_base_s"), not probe_s timed minutes apart
    times: dict[str, list[float]] = {key: [] for key in (*FEATURE_LAYOUTS, *MLP_FEATURES, "tp2_base_s")}
    for _ in range(FEATURE_ROUNDS):
        comm.barrier()
        times["tp2_base_s"].append(_median_time(step, 5, 2))
        for key, layout in FEATURE_LAYOUTS.items():
            times[key].append(_layout_probe(layout))
        for key, layout in MLP_FEATURES.items():
            times[key].append(_layout_probe(layout, mlp=True))
    out.update({key: statistics.median(ts) for key, ts in times.items()})
    return out


def _build_layout_probe(layout, mlp: bool = False):
    """(step, close) of the probe GPT (mlp: the MLP probe) under `layout`, built from its `trainlib train`
    flags as the trainer does."""
    import trainlib as tl
    from trainlib.config import load_config
    from trainlib.optim import DistributedOptimizer
    from trainlib.trainer import build_model, wrap, wrap_data_parallel

    batch = MLP_PROBE["batch"] if mlp else PROBE["batch"]
    shapes = [] if mlp else [f"--model.{k}={v}" for k, v in PROBE.items() if k != "batch"]
    cfg = load_config(None, [*layout.train_flags(batch), *shapes])
    mesh = tl.Mesh(pp=cfg.mesh.pp, dp=cfg.mesh.dp, tp=cfg.mesh.tp)
    rows = batch // mesh.size("dp")
    g = torch.Generator().manual_seed(mesh.rank("dp"))
    if mlp:
        from trainlib.benchmarks.dp_workloads import WideMLP
        from trainlib.compose import parallelize

        model = parallelize(WideMLP(MLP_PROBE["width"], MLP_PROBE["depth"]), mesh, loss_fn=torch.nn.functional.mse_loss,
                            dp_wrapper=lambda local: wrap_data_parallel(local, cfg, mesh))
        x, y = (torch.randn(rows, MLP_PROBE["width"], generator=g) for _ in range(2))
    else:
        model = wrap(build_model(cfg), cfg, mesh)
        x = y = torch.randint(0, PROBE["vocab_size"], (rows, PROBE["seq_len"]), generator=g)
    opt = DistributedOptimizer(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4), model)

    def step():
        model.step(x, y)
        model.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model.close


def _layout_probe(layout, mlp: bool = False) -> float:
    """Median step time of the probe GPT (mlp: the MLP probe) under `layout`, both ranks in it."""
    from trainlib import comm

    step, close = _build_layout_probe(layout, mlp)
    step()
    comm.barrier()
    t = _median_time(step, 7)
    close()
    return t


PROBE = {"n_layer": 2, "d_model": 96, "n_head": 4, "seq_len": 64, "vocab_size": 256, "batch": 8}
# feature probe rounds (_feature_probes): with 2 (their mean) the per-collective TP cost came out 2.6, 4.4 and
# 4.9 ms in three calibrations (13:11, 15:18, 15:59 on 2026-12-01) while the all-reduces in gpt-default's own
# tp=2 step took ~3 ms each (18:1x)
# 3 -> 5 (2026-12-02): three calibrations in a row at 12:4x read dp_step_s 4.5, 7.6 and 7.6 ms, zero_step_s 3.8,
# 2.6 and 5.4 ms, tp_collective_s 2.3, 1.3 and 1.3 ms: a median of 3 still moves with one slow round. Each round
# adds ~5 s to a calibration
FEATURE_ROUNDS = 5
# the checkpointing probes' rounds (plain, full, selective, and both in microbatches, in turn): 3 -> 5 with
# FEATURE_ROUNDS. The 09:51 run's calibration read selective_op_s 161 us where the eleven before it read
# 345-641 us, and its selectively checkpointed layouts came out 9-16% under (their median); ~3 s a round
CKPT_ROUNDS = 5
RECOMPUTE_SHARE = 1.0   # full checkpointing reruns the forward once (recompute_fit)
CKPT_MICRO = 8   # the checkpointing probes' second batch split: 8 checkpointed calls per block a step (one row each)
WIDE_PROBE = {**PROBE, "d_model": 256}   # the same probe wider: how efficiency grows with the model's width
MAX_EFFICIENCY = 2.0


# a compressed ZeRO sync large enough that its reduce-scatters outlast the backward (gloo's, on CPU): how much
# of them runs beside it (compress_overlap). 7M parameters, 16 rows: a few-row step bound by its weights' bytes
MLP_PROBE = {"width": 1536, "depth": 3, "batch": 16}
MLP_FEATURES = {"mlp_zero1_s": Layout(1, 2, 1, shard="optimizer"),
                "mlp_zero1_bf16_s": Layout(1, 2, 1, shard="optimizer", compress="bf16")}
FEATURE_LAYOUTS = {"dp2_s": Layout(1, 2, 1), "zero1_s": Layout(1, 2, 1, shard="optimizer"),
                   "zero3_s": Layout(1, 2, 1, shard="parameters"),
                   "zero3_bf16_s": Layout(1, 2, 1, shard="parameters", compress="bf16"), "tp2_s": Layout(1, 1, 2)}


def probe_spec(shape: dict = PROBE):
    """The probe GPT as the cost model sees it."""
    from trainlib.config import ModelConfig

    from .spec import ModelSpec

    return ModelSpec.gpt(ModelConfig(**{k: v for k, v in shape.items() if k != "batch"}))


def probe_step_fn(ac: str | None = None, shape: dict = PROBE, micro: int = 1):
    """A step function of the probe: forward + backward + clipping + AdamW of a small GPT (2 blocks,
    d_model 96, 8 x 64 tokens) on this rank alone, no communication; ac: its blocks checkpointed that way; micro: the
    batch in that many microbatches, gradients accumulated (each block checkpointed once per microbatch)."""
    from trainlib.activation_checkpointing import apply_activation_checkpointing
    from trainlib.models.gpt import GPT, GPTConfig, lm_loss

    cfg = GPTConfig(**{k: v for k, v in shape.items() if k != "batch"})
    model = GPT(cfg)
    apply_activation_checkpointing(model, ac)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (shape.get("batch", PROBE["batch"]), cfg.seq_len),
                      generator=torch.Generator().manual_seed(0))

    def step():
        for xs in x.chunk(micro):
            lm_loss(model(xs), xs).backward()
        # as the trainer steps (and the time model's optimizer term counts): the gradients clipped first
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    return step


def _probe_step() -> float:
    """The probe's step time on each rank at once: what the compute model is scaled to (compute_efficiency)."""
    return _median_time(probe_step_fn(), 7, 2)


def with_probe(prof: Profile, probe_s: float, note: str) -> Profile:
    """prof with compute_efficiency re-fitted to a probe step measured elsewhere (e.g. alongside the runs a
    validation times, so that both see the same share of a shared machine)."""
    values = dict(prof.values)
    values["compute_efficiency"] = efficiency({**values, "probe_s": probe_s, "compute_efficiency": 1.0})
    sources = {**prof.sources, "compute_efficiency": f"{prof.sources.get('compute_efficiency', '')}; {note}"}
    return Profile(prof.name, prof.device, prof.validated, values, sources,
                   {**prof.measured, "probe_s_refit": round(probe_s, 6)})


MEMORY_BOUND = ("mem_Bps", "matmul_weight_Bps", "sync_dram_Bps")   # figures the DRAM's bandwidth sets


def with_memory(prof: Profile, mem_Bps: float, note: str) -> Profile:
    """prof with its memory-bound figures scaled to a memory bandwidth measured elsewhere (memory_sounding,
    e.g. alongside the runs a validation times: a neighbour's memory traffic on a shared host moved this
    machine's copy bandwidth between 1.6e10 and 2.6e10 B/s from one calibration to the next)."""
    ratio = mem_Bps / prof["mem_Bps"]
    values = {**prof.values, **{k: prof[k] * ratio for k in MEMORY_BOUND if k in prof.values}}
    sources = {**prof.sources, **{k: f"{prof.sources.get(k, '')}; x {ratio:.3g}: {note}" for k in MEMORY_BOUND}}
    return Profile(prof.name, prof.device, prof.validated, values, sources,
                   {**prof.measured, "mem_Bps_refit": round(mem_Bps)})


def width_fit(values: dict, probe_s: float, probe_wide_s: float) -> tuple[float, float]:
    """(compute_efficiency, matmul_half_width) with which the time model reproduces both the probe and the
    same probe at d_model 256: a wider model's matmuls run nearer the peak (rate x d / (d + w)), by what the
    two measured steps say rather than by bare torch.mm shapes. w in [0, 4096], found by bisection (a larger
    w slows the narrow probe more than the wide one, so the wide one's prediction falls as w grows)."""
    def predicted_wide(w: float) -> tuple[float, float]:
        v = {**values, "matmul_half_width": w}
        eff = efficiency({**v, "probe_s": probe_s, "compute_efficiency": 1.0})
        return eff, _probe_time({**v, "compute_efficiency": eff}, WIDE_PROBE)

    lo, hi = 0.0, 4096.0
    eff, t = predicted_wide(lo)
    if t <= probe_wide_s:      # the wide probe is no faster than w = 0 says
        return eff, lo
    for _ in range(40):   # past the w where the efficiency reaches its cap the narrow probe no longer fits
        mid = (lo + hi) / 2
        eff, t = predicted_wide(mid)
        lo, hi = (mid, hi) if eff < MAX_EFFICIENCY and t > probe_wide_s else (lo, mid)
    return predicted_wide(lo)[0], lo


def _probe_time(values: dict, shape: dict) -> float:
    from .spec import ClusterSpec
    from .timing import step_time

    return step_time(probe_spec(shape), Layout(1, 1, 1), ClusterSpec(1, 1, "cpu", 10.0, 8.0),
                     Profile("probe", "cpu", True, values, {}), shape["batch"]).total


def efficiency(values: dict) -> float:
    """compute_efficiency such that the time model reproduces the probe's measured step."""
    rest = _probe_time({**values, "compute_efficiency": 1.0, "matmul_fp32_flops": 1e30}, PROBE)
    matmul_t = _probe_time({**values, "compute_efficiency": 1.0}, PROBE) - rest
    # above 1 when the width term (matmul_half_width) holds the narrow probe's matmuls well under the peak
    return min(MAX_EFFICIENCY, max(0.05, matmul_t / max(1e-9, values["probe_s"] - rest)))


def solve_increasing(f, want: float, lo: float, hi: float) -> float:
    """x in [lo, hi] with f(x) = want for an increasing f, by bisection; the nearer end when want lies outside
    [f(lo), f(hi)]."""
    if want <= f(lo) or want >= f(hi):
        return lo if want <= f(lo) else hi
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < want else (lo, mid)
    return (lo + hi) / 2


# what a device's own step runs on: rates, and per-op costs that grow as the device slows
PER_OP = ("op_s", "microbatch_block_s")
COMPUTE_SIDE = ("compute_efficiency", "mem_Bps", "matmul_weight_Bps", *PER_OP)


def _compute_scaled(prof: Profile, k: float) -> Profile:
    """prof with the device's compute-side rates k x slower (the collectives' figures as they are)."""
    v = dict(prof.values)
    for key in COMPUTE_SIDE:   # rates fall, the per-op cost grows
        v[key] = prof[key] * k if key in PER_OP else prof[key] / k
    return Profile(prof.name, prof.device, prof.validated, v, dict(prof.sources), dict(prof.measured))


def model_slowdown(prof: Profile, spec, batch: int, step_s: float) -> float:
    """k such that the time model, with COMPUTE_SIDE k x slower, gives `spec`'s single-device step (forward,
    backward and AdamW of `batch` samples, no parallelism) as `step_s`: bisection, the prediction grows with
    k. One factor for FLOPs, memory traffic and per-op costs alike: a model whose step is bound by its
    optimizer's or its weights' bytes (the wide MLP) moves the memory-bound terms, a GPT its matmuls."""
    from .spec import ClusterSpec
    from .timing import step_time

    def t(k: float) -> float:
        return step_time(spec, Layout(1, 1, 1), ClusterSpec(1, 1, prof.device, 10.0, 8.0), _compute_scaled(prof, k),
                         batch).total

    return solve_increasing(t, step_s, 0.2, 5.0)


def gpt_shape(cfg, batch: int) -> dict:
    """probe_step_fn's shape for a GPT config (trainlib.config.ModelConfig) on `batch` sequences."""
    return {"n_layer": cfg.n_layer, "d_model": cfg.d_model, "n_head": cfg.n_head, "seq_len": cfg.seq_len,
            "vocab_size": cfg.vocab_size, "batch": batch}


def _model_step(shape: dict) -> float:
    """Median step of a GPT of `shape` (its batch included) on this rank alone, every rank at once."""
    from trainlib import comm

    step = probe_step_fn(shape=shape)
    comm.barrier()
    return _median_time(step, 7)


def measure_model_step(shape: dict, ranks: int) -> float:
    """`trainlib plan --probe-model`: the planned GPT's single-device step (forward, backward, clipping, AdamW of
    shape["batch"] sequences), timed on `ranks` local ranks at once, as the layouts would share the
    machine; the slowest rank's median."""
    from trainlib.benchmarks.plan_ranks import spawn_ranks

    threads = str(max(1, (os.cpu_count() or 1) // ranks))
    return max(spawn_ranks(_model_step, ranks, threads, shape))


def with_model_probe(prof: Profile, spec, batch: int, step_s: float, note: str) -> Profile:
    """prof with its compute side re-fitted to a step of the planned model itself on one device
    (model_slowdown): what an operator-profiling simulator does, for a model that fits on one device."""
    k = model_slowdown(prof, spec, batch, step_s)
    out = _compute_scaled(prof, k)
    for key in COMPUTE_SIDE:
        out.sources[key] = f"{prof.sources.get(key, '')}; {note} (x{k:.3f} slower)"
    out.measured = {**prof.measured, "model_probe_s": round(step_s, 6), "model_slowdown": round(k, 4)}
    return out


def _accumulated(values: dict, ac: str, micro: int, **override) -> float:
    """The time model's probe step with its batch in `micro` microbatches, gradients accumulated (one
    optimizer step): micro forwards and backwards of batch / micro each."""
    from .spec import ClusterSpec
    from .timing import step_time

    prof = Profile("probe", "cpu", True, {**values, **override}, {})
    t = step_time(probe_spec(), Layout(1, 1, 1, ac=ac), ClusterSpec(1, 1, "cpu", 10.0, 8.0), prof,
                  PROBE["batch"] // micro)
    # step_time splits a batch only for a pipeline: the cost of each microbatch after the first added here
    return micro * (t.total - t.optimizer) + t.optimizer + (micro - 1) * PROBE["n_layer"] * prof["microbatch_block_s"]


def microbatch_fit(values: dict, measured: dict) -> float:
    """microbatch_block_s: the plain probe in CKPT_MICRO microbatches over the whole batch (timed in turn), less
    what the model already gives for the split (its per-microbatch ops and small-call matmul rate), per block
    of each microbatch after the first (0 without the microbatched measurement: an older profile's)."""
    if "probe_plain_micro_s" not in measured:
        return 0.0
    base = {**values, "microbatch_block_s": 0.0}
    modelled = _accumulated(base, "none", CKPT_MICRO) - _accumulated(base, "none", 1)
    got = measured["probe_plain_micro_s"] - measured.get("probe_plain_s", measured["probe_s"])
    return max(0.0, (got - modelled) / ((CKPT_MICRO - 1) * PROBE["n_layer"]))


def dp_step_fit(values: dict, measured: dict) -> float:
    """dp_step_s: the probe at dp=2 (half the batch a rank) over the plain probe timed in the same rounds, less the
    modelled difference (the half batch's compute, the sync's bytes): the cost of a data-parallel step the model
    does not count (0 without the dp=2 probe: an older profile's)."""
    from .spec import ClusterSpec
    from .timing import step_time

    if "dp2_s" not in measured:
        return 0.0
    prof = Profile("probe", "cpu", True, {**values, "dp_step_s": 0.0}, {})
    spec, batch = probe_spec(), PROBE["batch"]
    modelled = (step_time(spec, FEATURE_LAYOUTS["dp2_s"], ClusterSpec(1, 2, "cpu", 10.0, 8.0), prof, batch).total
                - step_time(spec, Layout(1, 1, 1), ClusterSpec(1, 1, "cpu", 10.0, 8.0), prof, batch).total)
    base = measured.get("tp2_base_s", measured["probe_s"])   # the plain probe timed in the feature rounds
    return max(0.0, measured["dp2_s"] - base - modelled)


def recompute_fit(values: dict, measured: dict, plain: float) -> tuple[float, float]:
    """(recompute_share, checkpoint_call_s): full checkpointing reruns each block's forward once (share 1: the
    modelled forward, which compute_efficiency already fits) and pays a fixed cost per checkpointed call (n_layer
    a microbatch). The call cost is the least-squares fit of what the probe with full checkpointing costs over
    the plain probe, measured with the batch whole and in CKPT_MICRO microbatches, less the modelled op costs and
    recomputation (the whole batch alone for an older profile's measurements). Fitting the share as a second
    unknown, as this did before, was ill-conditioned: the two equations differ mostly in the call count, and over
    nine calibrations here the share came out 0.24-1.52 with the same code, moving the checkpointed pipelines'
    predictions 20% from one run to the next (the runs that fitted 0.24-0.65 under-predicted them by 8-12% at
    the median, the one at 1.52 over-predicted by 9%; with the share at 1 the nine runs' medians read 0.97-1.05x)."""
    n, k = PROBE["n_layer"], CKPT_MICRO

    def excess(micro: int, measured_full: float, measured_plain: float) -> float:
        """measured full-checkpointing cost over plain, less the modelled cost at share 1 and no call cost"""
        none = _accumulated(values, "none", micro)
        full = _accumulated(values, "full", micro, recompute_share=RECOMPUTE_SHARE, checkpoint_call_s=0.0)
        return measured_full - measured_plain - (full - none)

    eqs = [(n, excess(1, measured["probe_full_s"], plain))]       # (calls a step, cost they leave)
    if "probe_full_micro_s" in measured:
        eqs.append((k * n, excess(k, measured["probe_full_micro_s"], measured["probe_plain_micro_s"])))
    call_s = sum(c * d for c, d in eqs) / sum(c * c for c, _ in eqs)
    return RECOMPUTE_SHARE, max(0.0, call_s)


def feature_costs(values: dict, measured: dict) -> dict[str, float]:
    """The feature costs (profile keys recompute_share, checkpoint_call_s, microbatch_block_s, selective_op_s, solo_speedup,
    zero3_unit_s, tp_collective_s, dp_step_s, zero_step_s, compress_collective_s, compress_overlap) that make the time
    model reproduce the probe's measured steps under each feature:
    each is the measured difference to the plain probe (or ZeRO-3 to ZeRO-1) less what the model already
    predicts for it, per unit of what the feature pays per step."""
    from .spec import ClusterSpec
    from .timing import OPS_PER_BLOCK, sharded_collectives, step_time

    spec = probe_spec()
    alone, pair = ClusterSpec(1, 1, "cpu", 10.0, 8.0), ClusterSpec(1, 2, "cpu", 10.0, 8.0)

    def t(layout, cluster, **override) -> float:
        prof = Profile("probe", "cpu", True, {**values, **override}, {})
        return step_time(spec, layout, cluster, prof, PROBE["batch"]).total

    base, n = t(Layout(1, 1, 1), alone), PROBE["n_layer"]
    probe = measured["probe_s"]
    plain = measured.get("probe_plain_s", probe)   # timed in turn with the checkpointed probes
    micro_s = microbatch_fit(values, measured)
    values = {**values, "microbatch_block_s": micro_s}
    share, call_s = recompute_fit(values, measured, plain)
    sel = t(Layout(1, 1, 1, ac="selective"), alone, selective_op_s=0.0) - base
    z3 = (t(FEATURE_LAYOUTS["zero3_s"], pair, zero3_unit_s=0.0) - t(FEATURE_LAYOUTS["zero1_s"], pair))
    tp = t(FEATURE_LAYOUTS["tp2_s"], pair, tp_collective_s=0.0) - base
    z3c = FEATURE_LAYOUTS["zero3_bf16_s"]
    units = n + 2   # the planner's pipeline layers: embedding, blocks, head
    out = {
        "recompute_share": share,
        "checkpoint_call_s": call_s,
        "microbatch_block_s": micro_s,
        "selective_op_s": max(0.0, (measured["probe_selective_s"] - plain - sel) / (n * OPS_PER_BLOCK)),
        "solo_speedup": min(4.0, max(1.0, probe / measured["probe_solo_s"])),
        "zero3_unit_s": max(0.0, (measured["zero3_s"] - measured["zero1_s"] - z3) / (2 * units)),
        # tp=2 over the plain probe timed in the same rounds (older profiles: the probe timed apart)
        "tp_collective_s": max(0.0, (measured["tp2_s"] - measured.get("tp2_base_s", probe) - tp) / (4 * n + 3)),
    }
    if "dp2_s" in measured:   # profiles measured before these probes existed keep 0
        z1 = t(FEATURE_LAYOUTS["zero1_s"], pair, zero_step_s=0.0) - t(FEATURE_LAYOUTS["dp2_s"], pair)
        out["zero_step_s"] = max(0.0, measured["zero1_s"] - measured["dp2_s"] - z1)
        out["dp_step_s"] = dp_step_fit(values, measured)
    if "zero3_bf16_s" in measured:
        per = sharded_collectives(z3c, 0.0, units)   # ZeRO-3: per unit, whatever the bytes
        overlap = 0.0
        # the two depend on each other (the probe's reduce-scatters hide behind its backward, the MLP
        # probe pays a cost per collective): a few rounds of each given the other settle them
        for _ in range(3 if "mlp_zero1_bf16_s" in measured else 1):
            zc = (t(z3c, pair, compress_collective_s=0.0, zero3_unit_s=0.0, compress_overlap=overlap)
                  - t(FEATURE_LAYOUTS["zero3_s"], pair, zero3_unit_s=0.0))
            out["compress_collective_s"] = max(0.0, (measured["zero3_bf16_s"] - measured["zero3_s"] - zc) / per)
            if "mlp_zero1_bf16_s" in measured:
                overlap = compress_overlap_fit({**values, **out}, measured)
        out["compress_overlap"] = overlap
    return out


def compress_overlap_fit(values: dict, measured: dict) -> float:
    """compress_overlap in [0, 1] at which the time model gives the MLP probe's compressed ZeRO-1 step over its
    plain ZeRO-1 step as measured (the model's difference falls as the share grows): bisection."""
    from .spec import ClusterSpec, ModelSpec
    from .timing import step_time

    spec, pair = ModelSpec.mlp(MLP_PROBE["width"], MLP_PROBE["depth"]), ClusterSpec(1, 2, "cpu", 10.0, 8.0)

    def diff(share: float) -> float:
        prof = Profile("probe", "cpu", True, {**values, "compress_overlap": share}, {})
        return (step_time(spec, MLP_FEATURES["mlp_zero1_bf16_s"], pair, prof, MLP_PROBE["batch"]).total
                - step_time(spec, MLP_FEATURES["mlp_zero1_s"], pair, prof, MLP_PROBE["batch"]).total)

    return solve_increasing(lambda share: -diff(share), measured["mlp_zero1_s"] - measured["mlp_zero1_bf16_s"], 0.0, 1.0)


def runtime_bytes(measured_peak: float, ranks: int) -> float:
    """The probe's measured peak less what the memory model predicts for it (>= 0)."""
    from .memory import peak_memory

    return max(0.0, measured_peak - peak_memory(probe_spec(), Layout(1, ranks, 1), PROBE["batch"],
                                                shm_ranks=ranks).peak)


def _inter_node() -> tuple[float, str]:
    from trainlib.benchmarks.paths import results_dir

    path = results_dir() / "cluster.json"
    try:
        kappa = json.loads(path.read_text())["model"]["params"]["allreduce"]["kappa"]
        return 1 / kappa, f"1/kappa of the ring all-reduce fitted by `trainlib bench cluster` ({path.name})"
    except (OSError, KeyError, ValueError):
        return 0.85, "assumed (no benchmarks/results/cluster.json): NCCL/gloo reach ~85% of line rate"


def calibrate(ranks: int = 2) -> Profile:
    # spawning local ranks is test machinery, which the library does not import: the benchmarks hold it
    from trainlib.benchmarks.plan_ranks import spawn_ranks

    load_before = os.getloadavg()
    t0 = time.time()
    threads = str(max(1, (os.cpu_count() or 1) // ranks))
    per_rank = spawn_ranks(_rank_measure, ranks, threads)
    peak = max(spawn_ranks(_memory_probe, ranks, threads))   # fresh processes: see _memory_probe
    for r in per_rank:
        r["probe_peak_bytes"] = peak
    keys = per_rank[0].keys()
    # per-rank rates: the slower rank sets the pace of a synchronous step
    values = {k: (min if k.endswith(("flops", "Bps")) else max)(r[k] for r in per_rank) for k in keys}
    values["matmul_half_rows"] = statistics.median(r["matmul_half_rows"] for r in per_rank)
    values["matmul_half_width"] = statistics.median(r["matmul_half_width"] for r in per_rank)
    eff, eff_src = _inter_node()
    values.update(inter_alpha_s=values["intra_alpha_s"], inter_efficiency=eff, overlap=0.0, runtime_bytes=0.0)
    probe_s, probe_wide_s = values.pop("probe_s"), values.pop("probe_wide_s")
    features = {k: values.pop(k) for k in (*FEATURE_LAYOUTS, *MLP_FEATURES, "probe_plain_s", "probe_full_s", "probe_selective_s",
                                           "probe_plain_micro_s", "probe_full_micro_s", "tp2_base_s",
                                           "probe_solo_s")}
    mm_half_width = values["matmul_half_width"]
    values["compute_efficiency"], values["matmul_half_width"] = width_fit(values, probe_s, probe_wide_s)
    values.update(feature_costs(values, {**features, "probe_s": probe_s}))
    values["runtime_bytes"] = runtime_bytes(values.pop("probe_peak_bytes"), ranks)
    how = f"measured on {ranks} ranks at once, OMP_NUM_THREADS={threads}"
    sources = {
        "matmul_fp32_flops": f"measured: torch.mm (r x d) @ (d x 4d), d in 96/128/256/512, r in 16/2048, fit "
                             f"rate = peak r / (r + h) d / (d + w); {how}",
        "matmul_half_rows": "measured: h of the fit above (fp32)",
        "matmul_half_width": "fitted: w of rate = peak d / (d + w) with which the probe GPT at d_model 96 and at "
                             f"256 both come out as measured (torch.mm alone, d in 96..512 at 2048 rows: "
                             f"{mm_half_width:.3g})",
        "matmul_bf16_flops": f"measured: as fp32, bfloat16 tensors; {how}",
        "mem_Bps": f"measured: copy_ of 256 MiB, 2 x bytes / time; {how}",
        "op_s": "measured: forward + backward of 64 chained Linear(4, 4), per layer",
        "intra_alpha_s": "measured: a 4-byte gloo all-reduce between 2 ms pieces of matmul, minus the matmul "
                         "alone, / 2 (the cost of meeting the other rank, scheduling included)",
        "intra_Bps": "measured: gloo all-reduce 64 KiB..8 MiB, fit t = 2a + M/B (n = 2)",
        "sync_alpha_s": "measured: shared-memory all-reduce (trainlib.sync.shm) 64 KiB..8 MiB, same fit",
        "compress_alpha_s": "measured: gloo all-reduce of bfloat16 tensors, 64 KiB..8 MiB, same fit",
        "compress_Bps": "measured: as compress_alpha_s",
        "sync_Bps": "measured: as sync_alpha_s",
        "sync_dram_Bps": "measured: the same all-reduce at 64 MiB minus at 8 MiB, per byte (past the caches)",
        "matmul_weight_Bps": f"measured: 16 MiB fp32 weight / the median of x W^T, dy W and dy^T x with 8 rows, "
                             f"d = 2048; {how}",
        "rs_ag_over_ar": "measured: gloo reduce-scatter + all-gather over all-reduce, mean of 8 and 64 MiB",
        "sync_rs_ag_over_ar": "measured: shared-memory (trainlib.sync.shm) reduce-scatter + all-gather over its "
                              "all-reduce, in place, mean of 8 and 64 MiB",
        "pp_action_s": "measured: trainlib Pipeline, 2 tiny stages, 1F1B m=8, step time / actions minus intra_alpha",
        "ps_msg_s": "measured: colocated ParameterServer syncs of 4 MiB in 1 partition and 16 MiB in 4 and in 16 "
                    "minus the backward, 2 workers; fit t = a + msgs * c + 2M / B",
        "ps_Bps": "measured: as ps_msg_s",
        "ps_sync_s": "measured: as ps_msg_s (a)",
        "grad_call_s": "measured: a 16-layer stage of Linear(16, 16) + Tanh, ZB-H1's split backward (I, then W "
                       "per module) minus a plain backward, per module",
        "inter_alpha_s": "assumed = intra_alpha_s (TCP over the emulated cluster's veth links)",
        "inter_efficiency": eff_src,
        "overlap": "assumed 0: on CPU the sync's copies and sums run on the cores the backward uses",
        "runtime_bytes": "measured: the probe GPT's peak RSS at dp=2 over the RSS before it was built (2 steps, "
                         "in processes of its own, warmed up, the median of 3, mmap threshold pinned at 4 KiB) "
                         "less the memory model's peak for it: the runtime's own buffers",
        "compute_efficiency": "measured: a probe GPT (2 blocks, d_model 96, 8 x 64 tokens; not a validated shape) "
                              "steps with AdamW on each rank at once; the share of the fitted matmul rate that "
                              "makes the time model reproduce it",
        "checkpoint_call_s": f"measured: the probe with full checkpointing minus without, with the batch whole and in "
                             f"{CKPT_MICRO} microbatches (timed in turn, 3 rounds), less the modelled recomputation "
                             "(one forward) and op costs, per checkpointed call (least squares over the two)",
        "microbatch_block_s": f"measured: the probe in {CKPT_MICRO} microbatches minus whole (timed in turn, 3 "
                              "rounds), less the modelled difference, per block of each microbatch after the first",
        "recompute_share": "fixed at 1: full checkpointing reruns the forward once (fitted as a second unknown it "
                           "came out 0.24-1.52 over nine calibrations here: ill-conditioned)",
        "selective_op_s": "measured: the probe with selective checkpointing minus without (timed in turn), less "
                          "the modelled elementwise recompute, per block op",
        "solo_speedup": "measured: the probe on both ranks at once over the probe on one rank while the other "
                        "waits (the slower rank's)",
        "zero3_unit_s": "measured: the probe at dp=2 with ZeRO-3 minus ZeRO-1 (as trainlib train builds them), "
                        "less the modelled difference, per unit gather (2 per layer per microbatch)",
        "tp_collective_s": "measured: the probe at tp=2 minus the plain probe, less the modelled difference, per "
                           "tensor-parallel all-reduce",
        "dp_step_s": "measured: the probe at dp=2 (as trainlib train builds it) minus the plain probe timed in the "
                     "same rounds, less the modelled difference",
        "zero_step_s": "measured: the probe at dp=2 with ZeRO-1 minus plain data parallel (as trainlib train builds "
                       "them), less the modelled difference",
        "compress_overlap": f"measured: an MLP probe ({MLP_PROBE['depth']} x Linear({MLP_PROBE['width']}), "
                            f"{MLP_PROBE['batch']} rows) at dp=2, ZeRO-1 with bf16 compression minus without, as "
                            "trainlib train builds them: the share at which the model gives that difference",
        "compress_collective_s": "measured: the probe at dp=2 with ZeRO-3 and bf16 compression minus ZeRO-3, less "
                                 "the modelled difference, per collective the compressed sync starts",
    }
    measured = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__, "ranks": ranks,
                "loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after": [round(x, 2) for x in os.getloadavg()], "wall_s": round(time.time() - t0, 1),
                "per_rank": per_rank, "probe_s": probe_s, "probe_wide_s": probe_wide_s, "feature_probes_s": features}
    return Profile(f"cpu measured {measured['date'][:16]}", "cpu", True, values, sources, measured)
