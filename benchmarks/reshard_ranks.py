"""Per-rank bodies of `trainlib bench reshard` (run by run_ranks children).

    make_state     1 rank: the reference state S (the GPT after one AdamW step, unsharded), written three
                   ways: trainlib's checkpoint, DCP's checkpoint, and ref.safetensors (what every later load
                   is checked against, bit for bit)
    load_phase     N ranks: each candidate (a target layout + the checkpoint it loads) scrubbed, loaded, timed
                   and checked, in alternating rounds; then, when asked, each saves what it loaded under its
                   own layout (the next phase's source)

A candidate's time is the load call only (trainlib: resume.restore, which finds the layout change and
reshards; DCP: get_state_dict + dcp.load + set_state_dict, its documented resume recipe), per rank,
then the slowest rank. Before each load the target's weights are zeroed and its optimizer state
dropped, so every repetition loads from scratch and a load that leaves anything out fails the check.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from trainlib import comm
from trainlib.benchmarks.harness import alternate

COUNTERS = {"loss_first": 5.5, "window_loss": 0.0, "window_steps": 0, "nonfinite_skipped": 0}


def _cfg(overrides: list[str], ck_dir: str = ""):
    from trainlib.config import load_config

    return load_config(None, [*overrides, *(["--checkpoint.dir", ck_dir] if ck_dir else [])])


def _sampler(cfg):
    from trainlib.data import DistributedSampler, default_tokens

    return DistributedSampler(default_tokens(1 << 16), cfg.model.seq_len, cfg.train.batch_size, 0, 1,
                              seed=cfg.train.seed)


def _rchar() -> int:
    """Bytes this process passed through read()/readinto() so far (page-cache hits included);
    -1 where /proc/self/io is missing."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def _slowest(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    comm.all_reduce(t, op="max")
    return float(t.item())


# ---- trainlib targets -------------------------------------------------------------------------
def _trainlib(overrides: list[str], ck_dir: str):
    """The trainer's own construction (trainer.train's lines): model, DistributedOptimizer, sampler."""
    import trainlib as tl
    from trainlib import trainer

    cfg = _cfg(overrides, ck_dir)
    mesh = tl.Mesh(pp=cfg.mesh.pp, dp=cfg.mesh.dp, tp=cfg.mesh.tp)
    model = trainer.build_model(cfg)
    if mesh.size("pp") > 1 or mesh.size("tp") > 1:
        model = trainer.wrap_parallel(model, cfg, mesh)
    else:
        model = trainer.wrap_data_parallel(model, cfg, mesh)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = tl.DistributedOptimizer(torch.optim.AdamW(params, lr=cfg.train.lr, betas=(0.9, 0.95),
                                                    weight_decay=cfg.train.weight_decay), model)
    return cfg, model, opt


def _tl_scrub(model, opt) -> None:
    dp = getattr(model, "dp_model", model)
    with torch.no_grad():
        if getattr(dp, "sharded", False):   # the slices are the state (ZeRO-3 frees the module's parameters)
            for of in ("params", "master"):
                for t in dp.param_slices(of).values():
                    t.zero_()
        else:
            for p in getattr(model, "module", model).parameters():
                p.zero_()
    opt.inner.state.clear()


def _tl_check(model, opt, ref: dict[str, torch.Tensor]) -> list[str]:
    """Names whose loaded weights, masters or AdamW moments on this rank differ from its cut of S."""
    from trainlib.checkpoint import layout, reshard

    lay = layout.layout_of(model)
    dp = getattr(model, "dp_model", model)
    sharded = dp if getattr(dp, "sharded", False) else None
    local = dict(getattr(model, "module", model).named_parameters())
    bad = []
    for of in (("params", "master") if sharded is not None else ("params",)):
        values = sharded.param_slices(of) if sharded is not None else {k: p.detach() for k, p in local.items()}
        for name, e in lay["params"].items():
            if "dp" in e and e["dp"] is None:
                continue
            want = reshard._cut(ref[f"p:{name}"], e)
            if not torch.equal(values[e["key"]].float().reshape(want.shape), want):
                bad.append(f"{of}:{name}")
    inner = opt.inner
    tensors = [t for g in inner.param_groups for t in g["params"]]
    if sharded is not None:   # inner tensors are flat slices of named parameters (opt.slices says which)
        by_key = {e["key"]: n for n, e in lay["params"].items()}
        where = [(by_key[s["name"]], slice(s["start"], s["end"])) for s in opt.slices]
    else:
        names = {id(p): n for n, p in local.items()}
        full = {e["key"]: (n, e) for n, e in lay["params"].items()}
        where = [(full[names[id(t)]][0], full[names[id(t)]][1]) for t in tensors]
    for t, (name, cut) in zip(tensors, where):
        st = inner.state.get(t, {})
        for k, short in (("exp_avg", "m"), ("exp_avg_sq", "v")):
            ref_t = ref[f"{short}:{name}"]
            want = ref_t.reshape(-1)[cut] if isinstance(cut, slice) else reshard._cut(ref_t, cut)
            if k not in st or not torch.equal(st[k].reshape(want.shape), want):
                bad.append(f"{k}:{name}")
        if float(st.get("step", -1)) != float(ref["step"]):
            bad.append(f"step:{name}")
    return bad


# ---- DCP targets -------------------------------------------------------------------------------
def _dcp_target(overrides: list[str], fsdp2: bool):
    from trainlib import trainer
    from trainlib.benchmarks import zero_peers

    cfg = _cfg(overrides)
    model = trainer.build_model(cfg)
    if fsdp2:   # torch's recipe: every block, then the root
        from torch.distributed.device_mesh import init_device_mesh

        fully_shard = zero_peers.fully_shard_fn()
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(0.9, 0.95),
                            weight_decay=cfg.train.weight_decay)
    return model, opt


def _dcp_scrub(model, opt) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    opt.state.clear()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t   # collective for an FSDP2 DTensor


def _dcp_check(model, opt, ref: dict[str, torch.Tensor]) -> list[str]:
    bad = []
    for name, p in model.named_parameters():
        if not torch.equal(_full(p.detach()), ref[f"p:{name}"]):
            bad.append(f"params:{name}")
        st = opt.state.get(p, {})
        for k, short in (("exp_avg", "m"), ("exp_avg_sq", "v")):
            if k not in st or not torch.equal(_full(st[k]), ref[f"{short}:{name}"]):
                bad.append(f"{k}:{name}")
        step = st.get("step", -1)
        if float(_full(step) if isinstance(step, torch.Tensor) else step) != float(ref["step"]):
            bad.append(f"step:{name}")
    return bad


def _dcp_load(model, opt, ck: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=ck)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def _dcp_save(model, opt, ck: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ck)


# ---- the floor: read and hash the old files trainlib reads -------------------------------------
def _floor(src: str) -> tuple[Callable[[], None], Callable[[], list[str]]]:
    """Read every old rank's safetensors file of the checkpoint into one buffer and sha256 it, as
    trainlib's verified read does (stfile.read_verified): the cost of the bytes alone, no parsing or
    placing. The check: every digest equals the manifest's."""
    import hashlib
    import json

    from trainlib.checkpoint import latest_step, step_dir
    from trainlib.checkpoint.store import MANIFEST

    path = Path(step_dir(src, latest_step(src)))
    want = {n: e["sha256"] for n, e in json.loads((path / MANIFEST).read_bytes())["body"]["files"].items()
            if n.endswith(".safetensors")}
    got: dict[str, str] = {}

    def load() -> None:
        got.clear()
        for name in sorted(want):
            size = (path / name).stat().st_size
            buf = torch.empty(size, dtype=torch.uint8)
            with open(path / name, "rb", buffering=0) as f:
                view, n = memoryview(buf.numpy()), 0
                while n < size:
                    n += f.readinto(view[n:])
            got[name] = hashlib.sha256(view).hexdigest()

    return load, lambda: [n for n in want if got.get(n) != want[n]]


# ---- phases ------------------------------------------------------------------------------------
def make_state(overrides: list[str], work: str) -> dict[str, Any]:
    """1 rank: S = the GPT after one AdamW step, saved by trainlib (unsharded, dp=1) and by DCP."""
    from safetensors.torch import save_file

    from trainlib import checkpoint as ck
    from trainlib.checkpoint import layout, resume
    from trainlib.models.gpt import lm_loss

    cfg, model, opt = _trainlib(overrides, "")
    sampler = _sampler(cfg)
    x, y = sampler.next_batch()
    lm_loss(model(x).float(), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    module = model.module
    ref = {}
    for name, p in module.named_parameters():
        st = opt.inner.state[p]
        ref.update({f"p:{name}": p.detach().clone(), f"m:{name}": st["exp_avg"].clone(),
                    f"v:{name}": st["exp_avg_sq"].clone()})
        ref["step"] = torch.tensor(float(st["step"]))
    save_file(ref, os.path.join(work, "ref.safetensors"))
    ck.save(os.path.join(work, "tl-1"), 1, resume.state_of(model, opt, sampler, COUNTERS), keep=1,
            layout=layout.layout_of(model))
    _dcp_save(module, opt.inner, os.path.join(work, "dcp-1"))
    return {"params": sum(p.numel() for p in module.parameters())}


def _candidate(load: Callable[[], None], scrub: Callable[[], None], check: Callable[[], list[str]],
               log: dict[str, list]) -> Callable[[], float]:
    def timed() -> float:
        scrub()
        comm.barrier()
        r0 = _rchar()
        t0 = time.perf_counter()
        load()
        dt = time.perf_counter() - t0
        log["read_bytes"].append(_rchar() - r0)
        log["rank_s"].append(dt)
        bad = check()   # untimed; every repetition, so no repetition scores with a wrong load
        log["mismatch"].extend(b for b in bad if b not in log["mismatch"])
        return _slowest(dt)
    return timed


def load_phase(overrides: list[str], work: str, reps: int, jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each job: {"name", "system": "trainlib" | "dcp" | "floor", "layout": overrides of the target layout,
    "source": checkpoint dir under work, "save_as": dir to save what was loaded (or None)}."""
    from safetensors.torch import load_file

    from trainlib import checkpoint as ck
    from trainlib.checkpoint import layout, resume

    torch.set_num_threads(1)
    ref = load_file(os.path.join(work, "ref.safetensors"))
    cands, logs, savers = {}, {}, []
    for job in jobs:
        src = os.path.join(work, job["source"])
        log = logs[job["name"]] = {"read_bytes": [], "rank_s": [], "mismatch": []}
        if job["system"] == "floor":
            load, check = _floor(src)
            cands[job["name"]] = _candidate(load, lambda: None, check, log)
        elif job["system"] == "trainlib":
            cfg, model, opt = _trainlib([*overrides, *job["layout"]], src)
            sampler = _sampler(cfg)

            def load(cfg=cfg, model=model, opt=opt, sampler=sampler) -> None:
                start, _ = resume.restore(cfg.checkpoint, model, opt, sampler, dict(COUNTERS))
                if start != 1:
                    raise RuntimeError(f"trainlib resumed step {start} from {cfg.checkpoint.dir}, expected 1")

            cands[job["name"]] = _candidate(load, lambda m=model, o=opt: _tl_scrub(m, o),
                                            lambda m=model, o=opt: _tl_check(m, o, ref), log)
            if job.get("save_as"):
                savers.append(lambda m=model, o=opt, s=sampler, d=job["save_as"]: ck.save(
                    os.path.join(work, d), 1, resume.state_of(m, o, s, COUNTERS), keep=1, layout=layout.layout_of(m)))
        else:
            model, opt = _dcp_target([*overrides, *job["layout"]], fsdp2=dist.get_world_size() > 1)
            cands[job["name"]] = _candidate(lambda m=model, o=opt, c=src: _dcp_load(m, o, c),
                                            lambda m=model, o=opt: _dcp_scrub(m, o),
                                            lambda m=model, o=opt: _dcp_check(m, o, ref), log)
            if job.get("save_as"):
                savers.append(lambda m=model, o=opt, d=job["save_as"]: _dcp_save(m, o, os.path.join(work, d)))
    for c in cands.values():   # warm-up: page cache, DCP's planner, allocator
        c()
    for log in logs.values():
        log["read_bytes"].clear()
        log["rank_s"].clear()
    res = alternate(cands, reps)
    for save in savers:   # what every candidate loaded (checked equal to S) under its own layout
        save()
    comm.barrier()
    for name, log in logs.items():
        res[name].update(log)
    return res


def dir_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
