"""Per-rank bodies of `trainlib bench zero` (run by run_ranks children).

    memory_phase  candidates one at a time in this process: model-state tensor bytes (state_bytes over the
                  candidate's model and optimizer, at three points of a step once the optimizer has state)
                  and the peak RSS delta (VmHWM reset before each candidate, baseline read after it)
    step_phase    every candidate built from the same weights, stepped on the same batches in rotating
                  order: step-time medians from one run, plus each one's losses and final weights vs the
                  first candidate's (a fast wrong answer is not a result)
    scale_rank    a few steps of one (large) GPT under an address-space cap: does it fit?

Candidates are specs {"kind": "tl" | "fsdp2" | "ds", "stage": 0-3, "precision": "fp32" | "bf16"}, and
"floor": the bare model and AdamW with no wrapper and no communication (each rank steps its own batch),
the step time no data-parallel runtime can beat (zero_floor.py).
"""
from __future__ import annotations

import gc
import re
import resource
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from trainlib import comm
from trainlib.benchmarks import dp_workloads as wl
from trainlib.benchmarks import zero_peers

SHARDS = {0: None, 1: "optimizer", 2: "gradients", 3: "parameters"}  # trainlib's spelling of ZeRO stages 0-3
PROBES = ("forward", "backward", "step")
# FlatBucket (sharded) and Bucket (replicated) fields that hold parameters, master weights or gradients
BUCKET_STATE_FIELDS = ("flat", "shard", "master", "grad", "grads")


# ---- the workload ------------------------------------------------------------------------------
def gpt_config(m: dict[str, int]):
    from trainlib.models.gpt import GPTConfig

    return GPTConfig(vocab_size=m["vocab"], seq_len=m["seq"], n_layer=m["layers"], n_head=m["heads"],
                     d_model=m["d_model"])


def gpt_params(m: dict[str, int]) -> int:
    """Parameter count of trainlib's GPT: per block 12 d^2 + 13 d; embeddings, final norm, untied head."""
    d, v = m["d_model"], m["vocab"]
    return m["layers"] * (12 * d * d + 13 * d) + v * d + m["seq"] * d + 2 * d + v * d


def block_params(m: dict[str, int]) -> int:
    return 12 * m["d_model"] ** 2 + 13 * m["d_model"]


def make_batches(m: dict[str, int], n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from trainlib.data import DistributedSampler, default_tokens

    world, rank = dist.get_world_size(), dist.get_rank()
    s = DistributedSampler(default_tokens(1 << 18), m["seq"], m["batch"] * world, rank, world, seed=0)
    return [s.next_batch() for _ in range(n)]


def make_optimizer(params) -> torch.optim.Optimizer:
    # foreach=False: torch's per-tensor AdamW is what DeepSpeed steps too; the foreach path would add
    # a transient copy of every state tensor to the peak (the same for all, but not model state)
    return torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from trainlib.models.gpt import lm_loss

    return lm_loss(out.float(), y)


def trainlib_sharding_available() -> str | None:
    """None when tl.DataParallel takes shard= and tl.DistributedOptimizer exists; else why not."""
    import inspect

    import trainlib as tl

    if "shard" not in inspect.signature(tl.DataParallel).parameters or not hasattr(tl, "DistributedOptimizer"):
        return "not available yet: tl.DataParallel has no shard= / tl.DistributedOptimizer is missing at this commit"
    return None


# ---- candidates --------------------------------------------------------------------------------
@dataclass
class Candidate:
    name: str
    kind: str
    model: nn.Module
    step: Callable[..., torch.Tensor]   # step(batch, probe=None); probe(point) at "forward", "backward", "step"
    roots: list[Any]                    # everything it holds (module, optimizer, engine, wrapper)
    close: Callable[[], None] = lambda: None
    state_roots: Callable[[], list[Any]] | None = None  # ZeRO's model states only (params, grads, optimizer
                                                        # state); None: not separable from buffers (DeepSpeed)


def build(name: str, spec: dict[str, Any], m: dict[str, int]) -> Candidate:
    from trainlib.models.gpt import GPT

    inner = GPT(gpt_config(m), seed=0)
    kind, stage, precision = spec["kind"], spec["stage"], spec.get("precision", "fp32")
    if kind == "fsdp2":
        model, step, roots = zero_peers.fsdp2(inner, stage == 3, precision, make_optimizer, loss_fn)
        opt = roots[1]
        return Candidate(name, kind, model, step, roots, state_roots=lambda: model_states(inner, opt))
    if kind == "ds":
        model, step, roots = zero_peers.deepspeed(inner, stage, m["batch"], block_params(m), make_optimizer,
                                                    loss_fn)
        return Candidate(name, kind, model, step, roots)
    if kind == "floor":
        return _floor(name, inner)
    if kind != "tl":
        raise ValueError(f"unknown candidate kind {kind!r}; use tl, fsdp2, ds or floor")
    return _trainlib(name, inner, stage, precision)


def _trainlib(name: str, inner: nn.Module, stage: int, precision: str) -> Candidate:
    import trainlib as tl

    kw: dict[str, Any] = {}
    if precision == "bf16":
        kw["mixed_precision"] = tl.MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if stage:
        kw["shard"] = SHARDS[stage]
    model = tl.DataParallel(inner, tl.Mesh(dp=-1), sync=tl.AllReduce(), **kw)
    if kw:  # sharded or fp32-master: the optimizer steps on slices
        opt = tl.DistributedOptimizer(make_optimizer(model.parameters()), model)
        scale = opt.scale_loss
    else:   # today's replicated DataParallel with a plain torch optimizer
        opt = make_optimizer([p for p in inner.parameters() if p.requires_grad])
        scale = (lambda loss: loss)

    def step(batch, probe=None) -> torch.Tensor:
        x, y = batch
        out = model(x)
        if probe is not None:
            probe("forward")
        loss = loss_fn(out, y)
        scale(loss).backward()
        if probe is not None:
            probe("backward")
        opt.step()
        if probe is not None:
            probe("step")
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    # model states: the parameters (and grads), the optimizer (master/grad slices, state) and the buckets'
    # parameter and gradient storage; not the wrapper's communication buffers (wires, their pool)
    def states() -> list[Any]:
        buckets = [getattr(b, f) for b in getattr(model, "buckets", []) for f in BUCKET_STATE_FIELDS if hasattr(b, f)]
        return model_states(inner, getattr(opt, "inner", opt)) + [buckets]

    return Candidate(name, "tl", model, step, [model, opt], model.close, state_roots=states)


def _floor(name: str, inner: nn.Module) -> Candidate:
    """Forward, backward and AdamW on this rank's batch, nothing else: no sync, no wrapper."""
    opt = make_optimizer([p for p in inner.parameters() if p.requires_grad])

    def step(batch, probe=None) -> torch.Tensor:
        x, y = batch
        out = inner(x)
        if probe is not None:
            probe("forward")
        loss = loss_fn(out, y)
        loss.backward()
        if probe is not None:
            probe("backward")
        opt.step()
        if probe is not None:
            probe("step")
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return Candidate(name, "floor", inner, step, [inner, opt], state_roots=lambda: model_states(inner, opt))


def model_states(module: nn.Module, opt: torch.optim.Optimizer) -> list[Any]:
    """The module's current parameters (with their grads and tensor attributes) and the optimizer's state and
    parameters -- not the module object itself: its hooks lead to the wrapper and its buffers."""
    return [list(module.parameters()), opt.state, opt.param_groups]


def final_params(c: Candidate) -> torch.Tensor:
    """The full fp32 weights in module order (collective for sharded candidates)."""
    if c.kind == "floor":
        return wl.flat_params(c.model)
    if c.kind == "tl":
        if getattr(c.model, "sharded", False):  # the replicated wrapper's own params are the full weights
            sd = c.model.full_state_dict()
            return torch.cat([t.detach().reshape(-1).float() for t in sd.values()])
        return wl.flat_params(c.model)
    return zero_peers.gathered_params(c.kind, c.model)


# ---- model-state bytes: walk the storages reachable from the candidate, count each once ----------
def shared_ranges() -> list[tuple[int, int, float]]:
    """This process's /dev/shm mappings as (start, end, charge): 0 for a buffer another rank made (trainlib's shm
    transport names them `...-buf{key}-{rank}` and maps every rank's into every rank of the node: the pages are
    the owner's), 1 for this rank's own, 1/world for an unnamed one (one copy among the ranks that map it)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) < 6 or not parts[5].startswith("/dev/shm/"):
                    continue
                lo, hi = parts[0].split("-")
                owner = re.search(r"-(\d+)(?: \(deleted\))?$", parts[5].strip())
                charge = (1.0 if int(owner.group(1)) == rank else 0.0) if owner else 1.0 / world
                out.append((int(lo, 16), int(hi, 16), charge))
    except OSError:
        pass
    return out


def state_bytes(roots: list[Any], shm: list[tuple[int, int, float]] | None = None, max_objects: int = 2_000_000) -> int:
    """Bytes of every distinct tensor storage reachable from `roots`: parameters (and their .grad and any
    tensors hung on them, e.g. DeepSpeed's ds_tensor), optimizer state, flat buckets, master copies,
    FSDP2's sharded data (reached through its hooks). Walks containers, object attributes, bound methods,
    partials and closures; not modules, classes or function globals (those lead to the whole program).
    A storage inside a /dev/shm mapping is charged as `shm` (from shared_ranges()) says."""
    total = 0.0
    for (ptr, _), nbytes in _storages(roots, max_objects).items():
        charge = next((c for lo, hi, c in shm or () if lo <= ptr < hi), 1.0)
        total += nbytes * charge
    return int(total)


def _storages(roots: list[Any], max_objects: int) -> dict[tuple[int, int], int]:
    import functools
    import types

    seen_obj: set[int] = set()
    storages: dict[tuple[int, int], int] = {}
    stack = list(roots)
    skip = (types.ModuleType, type, str, bytes, int, float, bool, type(None), torch.dtype, torch.device)
    while stack and len(seen_obj) < max_objects:
        o = stack.pop()
        if id(o) in seen_obj or isinstance(o, skip):
            continue
        seen_obj.add(id(o))
        if isinstance(o, torch.Tensor):
            _tensor(o, storages, stack)
            continue
        if isinstance(o, torch.UntypedStorage):   # memory held without a tensor (a pool of freed units)
            if o.device.type != "meta" and o.nbytes():
                storages[(o.data_ptr(), o.nbytes())] = o.nbytes()
            continue
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
            continue
        if isinstance(o, (list, tuple, set, frozenset)) or type(o).__name__ == "deque":
            stack.extend(o)
            continue
        if isinstance(o, types.MethodType):
            stack.extend((o.__self__, o.__func__))
            continue
        if isinstance(o, functools.partial):
            stack.extend((o.func, o.args, o.keywords or {}))
            continue
        if isinstance(o, types.FunctionType):
            stack.extend(c.cell_contents for c in (o.__closure__ or ()) if _cell_full(c))
            continue
        d = getattr(o, "__dict__", None)
        if isinstance(d, dict):
            stack.append(d)
        for slot in getattr(type(o), "__slots__", ()) or ():
            if isinstance(slot, str) and hasattr(o, slot):
                stack.append(getattr(o, slot))
    return storages


def _cell_full(c) -> bool:
    try:
        c.cell_contents
        return True
    except ValueError:
        return False


def _tensor(t: torch.Tensor, storages: dict[tuple[int, int], int], stack: list[Any]) -> None:
    if type(t) is not torch.Tensor and type(t) is not nn.Parameter and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()  # a wrapper subclass (DTensor): its storage is its inner tensors
        stack.extend(getattr(t, n) for n in names)
    elif t.device.type != "meta":
        try:
            s = t.untyped_storage()
            if s.nbytes():
                storages[(s.data_ptr(), s.nbytes())] = s.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
    if t.is_leaf and t.grad is not None:
        stack.append(t.grad)
    if t.__dict__:
        stack.append(t.__dict__)


# ---- memory -------------------------------------------------------------------------------------
TINY = {"vocab": 256, "seq": 16, "layers": 1, "heads": 2, "d_model": 32, "batch": 2}


def memory_phase(m: dict[str, int], specs: dict[str, dict[str, Any]], steps: int, reps: int,
                 warm: bool = True) -> dict[str, Any]:
    """Each candidate alone (one at a time, rotating order over `reps` rounds): model-state bytes at each probe
    point from step 2 on (the optimizer has state by then), and the peak RSS above the pre-build baseline.
    warm: first build and step every candidate once on a tiny GPT, so one-time costs (lazy imports, gloo
    buffers, DeepSpeed's set-up) land there and not in the first measured candidate's peak."""
    wl.fix_malloc_threshold()  # freed tensors go back to the OS, so each candidate starts from the same RSS
    if warm:
        tiny = make_batches(TINY, 2)
        for name, spec in specs.items():
            _one_memory(name, spec, TINY, tiny, 2)
    batches = make_batches(m, 2)
    out: dict[str, dict[str, Any]] = {}
    names = list(specs)
    for r in range(reps):
        for name in names[r % len(names):] + names[: r % len(names)]:
            rec = _one_memory(name, specs[name], m, batches, steps)
            prev = out.get(name)
            if prev is None or "error" in rec:
                out[name] = rec
                continue
            for key in ("peak_rss_delta", "peak_own_delta", "build_peak_rss_delta", "steps_peak_rss_delta",
                        "steps_own_peak_delta"):
                rec[key] = min(prev[key], rec[key])  # noise only adds: the smallest is the figure
                if key + "_all" in rec:
                    rec[key + "_all"] = prev[key + "_all"] + rec[key + "_all"]
            out[name] = rec
    return out


def _one_memory(name: str, spec: dict[str, Any], m: dict[str, int], batches: list, steps: int) -> dict[str, Any]:
    gc.collect()
    comm.barrier()
    reset_ok = wl.reset_peak_rss()
    rss0 = wl.status_kb("VmRSS") * 1024
    excess0 = rss0 - wl.pss_bytes()
    t0 = time.perf_counter()
    try:
        c = build(name, spec, m)
    except Exception as e:  # a peer that cannot run here is recorded, not fatal
        if spec["kind"] == "tl":
            raise
        return {"error": f"{type(e).__name__}: {e}"[:2000]}
    build_peak = wl.status_kb("VmHWM") * 1024 - rss0  # every row builds the full fp32 GPT, then shards it
    wl.reset_peak_rss()
    probes: dict[str, int] = {}
    state: dict[str, int] = {}
    shared_excess = [0]

    def probe(point: str) -> None:
        shm = shared_ranges()  # buffers may be mapped at any step
        probes[point] = max(probes.get(point, 0), state_bytes(c.roots, shm))
        if c.state_roots is not None:
            state[point] = max(state.get(point, 0), state_bytes(c.state_roots(), shm))
        # RSS counts a shared page fully in every process that maps it, PSS 1/n: the difference is what
        # this rank's RSS holds of its peers' shared buffers (trainlib's shm transport)
        shared_excess[0] = max(shared_excess[0], wl.status_kb("VmRSS") * 1024 - wl.pss_bytes())

    for i in range(steps):
        c.step(batches[i % len(batches)], probe if i >= 1 else None)
    comm.barrier()
    steps_peak = wl.status_kb("VmHWM") * 1024 - rss0
    hwm = rss0 + max(build_peak, steps_peak)
    c.close()  # its tensors go with this frame; the next row's gc.collect() clears any cycles
    # the peak less the peers' share of shared buffers (measured at the probes): this rank's own memory
    excess = max(0, shared_excess[0] - excess0)
    own = hwm - rss0 - excess
    return {"tensor_bytes": max(probes.values()), "tensor_bytes_at": probes, "baseline_rss": rss0,
            "model_state_bytes": max(state.values()) if state else None, "model_state_bytes_at": state or None,
            "peak_rss_delta": hwm - rss0, "peak_rss_delta_all": [hwm - rss0], "peak_own_delta": own,
            "peak_own_delta_all": [own], "build_peak_rss_delta": build_peak, "steps_peak_rss_delta": steps_peak,
            "steps_own_peak_delta": steps_peak - excess,
            "vmhwm_reset": reset_ok, "seconds": round(time.perf_counter() - t0, 2)}


# ---- step time ----------------------------------------------------------------------------------
def step_phase(m: dict[str, int], specs: dict[str, dict[str, Any]], reps: int, k: int) -> dict[str, Any]:
    batches = make_batches(m, 4)
    cands: dict[str, Candidate] = {}
    errors: dict[str, str] = {}
    for name, spec in specs.items():
        try:
            cands[name] = build(name, spec, m)
        except Exception as e:
            if spec["kind"] == "tl":
                raise
            errors[name] = f"{type(e).__name__}: {e}"[:2000]
    names = list(cands)
    losses: dict[str, list[float]] = {n: [] for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for n in names:  # warm-up: optimizers allocate their state, DeepSpeed and FSDP2 their buffers
        losses[n].append(float(cands[n].step(batches[0])))
    seen = 1
    for r in range(reps):
        for n in names[r % len(names):] + names[: r % len(names)]:
            comm.barrier()
            t0 = time.perf_counter()
            for i in range(k):
                losses[n].append(float(cands[n].step(batches[(seen + i) % len(batches)])))
            times[n].append((time.perf_counter() - t0) / k)
        seen += k
    ref = names[0]
    flat = {n: final_params(c) for n, c in cands.items()}
    out = {"reference": ref, "steps_per_candidate": seen, "step_s": times,
           "last_loss": {n: ls[-1] for n, ls in losses.items()},
           "max_loss_diff_vs_reference": {n: max(abs(a - b) for a, b in zip(ls, losses[ref]))
                                          for n, ls in losses.items()},
           "max_param_diff_vs_reference": {n: float((f - flat[ref]).abs().max()) if f.shape == flat[ref].shape
                                           else f"shape {tuple(f.shape)} != {tuple(flat[ref].shape)}"
                                           for n, f in flat.items()},
           "errors": errors}
    for c in cands.values():
        c.close()
    return out


def group(mem_model: dict[str, int] | None, mem_specs: dict, mem_steps: int, mem_reps: int,
          step_model: dict[str, int] | None, step_specs: dict, reps: int, k: int, warm: bool = True
          ) -> dict[str, Any]:
    """One spawned group: the memory phase (candidates alone), then the step phase (side by side)."""
    torch.set_num_threads(1)
    out: dict[str, Any] = {"rank": dist.get_rank()}
    if mem_model is not None:
        out["memory"] = memory_phase(mem_model, mem_specs, mem_steps, mem_reps, warm)
    if step_model is not None:
        out["steps"] = step_phase(step_model, step_specs, reps, k)
    return out


# ---- scale ---------------------------------------------------------------------------------------
def scale_rank(m: dict[str, int], spec: dict[str, Any], steps: int, cap_bytes: int | None) -> dict[str, Any]:
    """A few steps of one GPT with the address space capped at the current size + cap_bytes: an allocation past
    the cap fails inside this rank (a RuntimeError from torch's allocator) instead of taking the machine."""
    torch.set_num_threads(1)
    wl.fix_malloc_threshold()
    batches = make_batches(m, 2)
    gc.collect()
    wl.reset_peak_rss()
    rss0 = wl.status_kb("VmRSS") * 1024
    if cap_bytes is not None:
        vm = wl.status_kb("VmSize") * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + cap_bytes, resource.getrlimit(resource.RLIMIT_AS)[1]))
    t0 = time.perf_counter()
    out: dict[str, Any] = {"params": gpt_params(m), "baseline_rss": rss0}
    try:
        c = build("scale", spec, m)
        out["build_s"] = round(time.perf_counter() - t0, 2)
        out["build_peak_rss"] = wl.status_kb("VmHWM") * 1024  # the full fp32 GPT, then its shards
        wl.reset_peak_rss()
        t1 = time.perf_counter()
        out["losses"] = [float(c.step(batches[i % 2])) for i in range(steps)]
        out["step_s"] = round((time.perf_counter() - t1) / steps, 3)
        out["fits"] = True
    except (MemoryError, RuntimeError) as e:
        # raise, not return: the other rank may be waiting in a collective, and run_ranks stops the
        # group soon after a rank fails (a returned failure would leave it waiting for the timeout)
        raise RuntimeError(f"does not fit: peak RSS {wl.status_kb('VmHWM') / 2**20:.2f} GiB under a cap of "
                           f"{(cap_bytes or 0) / 2**30:.2f} GiB more address space: {type(e).__name__}: "
                           f"{str(e)[:300]}") from e
    out["steps_peak_rss"] = wl.status_kb("VmHWM") * 1024
    out["peak_rss"] = max(out["build_peak_rss"], out["steps_peak_rss"])
    out["peak_rss_delta"] = out["peak_rss"] - rss0
    return out
