"""Parameter server vs all-reduce: step time, push/pull throughput, and the cost model that says when PS wins.

    trainlib bench ps [--quick]
    trainlib bench ps --model --nodes 16 --gpus-per-node 8 --nic-gbps 100 --cpu-servers 16 [--grad-mb 1400]

1. Step time (2 workers, alternating, medians) on the default GPT (trainer defaults) and on a
   communication-heavy wide MLP (32 MiB of fp32 gradients, batch 8): no sync (compute only),
   all-reduce (gloo), PS colocated (each worker starts a server, as on 2 nodes), PS dedicated
   (2 server processes started here), and PS dedicated without authentication (--insecure servers). Communication time = step time - compute-only step time.
2. Push/pull throughput with 4 MiB partitions, 8 in flight: a raw pyzmq ROUTER that echoes each
   message (the transport's limit, no auth), the trainlib server with --insecure, and authenticated
   the two ways a server with a token can run (issue 17): per-direction Poly1305 message MACs plus
   the connection check at the ZeroMQ handshake, PLAIN (the default: a token-derived credential
   checked by ZAP, no per-byte cost) or CURVE (libzmq encrypts every byte). HMAC-SHA256's
   single-core speed is measured beside Poly1305's, as protocol v1 used it.
3. Cost model (BytePS, Jiang et al. OSDI 2020, section 3): with n workers, k servers, M bytes of
   gradients and per-machine bandwidth B,
        all-reduce  t_ar = 2(n-1)/n * M/B          PS  t_ps = max(M/B, n*M/(k*B))
   so PS on k spare CPU servers wins when max(1, n/k) < 2(n-1)/n: n > 2 and k > n^2 / (2(n-1)) ~ n/2.
   Colocated servers share their node's NIC and move the same bytes as a ring all-reduce.
   On loopback B is the measured raw pyzmq bandwidth; predictions are set beside the measured
   communication times. `--model` prints the prediction for a cluster you describe instead.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch
import torch.nn as nn

MB = 1024 * 1024
TOKEN = "bench-ps-token-" + "0123456789abcdef"
N_WORKERS = 2
PARTITION = 4 * MB
RAW_ECHO = """
import sys, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.setsockopt(zmq.LINGER, 0)
port = s.bind_to_random_port("tcp://127.0.0.1"); print(port, flush=True)
while True:
    s.send_multipart(s.recv_multipart(copy=False), copy=False)
"""


# -- cost model ---------------------------------------------------------------------------------
def t_allreduce(m_bytes: float, n: int, bw: float, alpha: float = 0.0) -> float:
    """Ring all-reduce: 2(n-1) steps, each moving M/n bytes per link."""
    return 2 * (n - 1) * (alpha + m_bytes / (n * bw)) if n > 1 else 0.0


def t_ps(m_bytes: float, n: int, k: int, bw: float, alpha: float = 0.0) -> float:
    """Push + pull: each worker moves M each way; each server moves n*M/k each way."""
    return 2 * alpha + max(m_bytes / bw, n * m_bytes / (k * bw))


def predict(nodes: int, gpus_per_node: int, nic_gbps: float, cpu_servers: int, grad_mb: float) -> dict:
    """Inter-node gradient sync for `nodes` machines; intra-node reduction (NVLink) assumed free.

    Dedicated: the `cpu_servers` CPU machines hold all partitions, t_ps = max(M/B, n*M/(k*B)).
    Colocated (one server per GPU node, sharing its NIC): each NIC carries (n-1)/n of its worker's
    pushes and pulls plus its server's share for the n-1 others, 2(n-1)/n * M/B: the same bytes as
    a ring all-reduce, which is why BytePS adds spare CPU machines to win."""
    bw = nic_gbps * 1e9 / 8
    m = grad_mb * MB
    ar = t_allreduce(m, nodes, bw)
    colocated = t_allreduce(m, nodes, bw)
    dedicated = t_ps(m, nodes, cpu_servers, bw) if cpu_servers else None
    best = dedicated if dedicated is not None else colocated
    return {"nodes": nodes, "gpus_per_node": gpus_per_node, "nic_gbps": nic_gbps, "cpu_servers": cpu_servers,
            "grad_mb": round(grad_mb, 3), "allreduce_ms": round(ar * 1e3, 3),
            "ps_colocated_ms": round(colocated * 1e3, 3),
            "ps_dedicated_ms": None if dedicated is None else round(dedicated * 1e3, 3),
            "ps_speedup": round(ar / best, 3) if best else None, "winner": "ps" if best < ar else "allreduce",
            "cpu_servers_needed_to_beat_allreduce": next((k for k in range(1, 4 * nodes + 1)
                                                          if t_ps(m, nodes, k, bw) < ar), None)}


# -- step time ----------------------------------------------------------------------------------
def _models(which: str, seed: int = 0):
    torch.manual_seed(seed)
    if which == "gpt":
        from trainlib.config import Config
        from trainlib.models.gpt import lm_loss
        from trainlib.trainer import build_model

        cfg = Config()
        model = build_model(cfg)
        g = torch.Generator().manual_seed(1)
        bsz = cfg.train.batch_size // N_WORKERS
        x = torch.randint(0, cfg.model.vocab_size, (bsz, cfg.model.seq_len), generator=g)
        y = torch.randint(0, cfg.model.vocab_size, (bsz, cfg.model.seq_len), generator=g)
        return model, lambda m: lm_loss(m(x), y)
    model = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024))  # 8.4M params, 32 MiB
    x = torch.randn(8, 1024, generator=torch.Generator().manual_seed(1))
    return model, lambda m: m(x).pow(2).mean()


def step_times(dedicated: list[str], noauth: list[str], which: str, reps: int) -> dict:
    """On each worker: one model copy per backend, timed in alternating rounds (harness.alternate)."""
    import trainlib as tl
    from trainlib import comm
    from trainlib.benchmarks.harness import alternate

    tl.init()
    base, loss_fn = _models(which)
    grad_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    backends = {"local": None, "allreduce": tl.AllReduce(),
                "ps_colocated": tl.ParameterServer(timeout_s=120),
                "ps_dedicated": tl.ParameterServer(servers=dedicated, token=TOKEN, timeout_s=120),
                # the same without authentication (servers started with --insecure): what authentication costs
                "ps_dedicated_noauth": tl.ParameterServer(servers=noauth, insecure=True, timeout_s=120)}
    models = {}
    for name, sync in backends.items():
        m, _ = _models(which)
        models[name] = m if sync is None else tl.DataParallel(m, sync=sync)
    opts = {n: torch.optim.SGD(m.parameters(), lr=1e-3) for n, m in models.items()}

    def one(name: str):
        def step() -> float:
            comm.barrier()  # start together; not timed
            t0 = time.perf_counter()
            opts[name].zero_grad(set_to_none=True)
            loss_fn(models[name]).backward()
            opts[name].step()
            return time.perf_counter() - t0
        return step

    cands = {n: one(n) for n in models}
    for fn in cands.values():  # warm-up: connections, allocations
        fn(), fn()
    res = alternate(cands, reps)
    out = {"grad_bytes": grad_bytes, "median_s": {n: r["median_s"] for n, r in res.items()},
           "partitions": len(models["ps_dedicated"].sync.partitions),
           "colocated_servers": [link.address for link in models["ps_colocated"].sync.client.links]}
    for m in models.values():
        if hasattr(m, "close"):
            m.close()
    return out


# -- push/pull throughput ------------------------------------------------------------------------
def _raw_echo():
    proc = subprocess.Popen([sys.executable, "-c", RAW_ECHO], stdout=subprocess.PIPE, text=True)
    return proc, f"127.0.0.1:{proc.stdout.readline().strip()}"


def throughput(n_parts: int, window: int, reps: int) -> dict:
    import zmq

    from trainlib.benchmarks.harness import alternate
    from trainlib.sync.ps.client import PSClient
    from trainlib.sync.ps.launch import spawn_server
    from trainlib.sync.ps.protocol import HEADER_SIZE, MAC_SIZE, DType, Op

    raw_proc, raw_addr = _raw_echo()
    servers = {"ps_auth": spawn_server(token=TOKEN, extra=("--conn-auth", "plain")),
               "ps_auth_curve": spawn_server(token=TOKEN, extra=("--conn-auth", "curve")),
               "ps_insecure": spawn_server(insecure=True)}
    payload = torch.randn(PARTITION // 4)
    buf = payload.numpy()
    moved = 2 * n_parts * PARTITION  # push + pull bytes per measurement
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://{raw_addr}")
    clients = {"ps_auth": PSClient([servers["ps_auth"].address], TOKEN, 0, 1, timeout_s=120, conn_auth="plain"),
               "ps_auth_curve": PSClient([servers["ps_auth_curve"].address], TOKEN, 0, 1, timeout_s=120,
                                         conn_auth="curve"),
               "ps_insecure": PSClient([servers["ps_insecure"].address], None, 0, 1, timeout_s=120)}
    for c in clients.values():
        c.hello()
    steps = {name: 0 for name in clients}

    def raw() -> float:
        t0 = time.perf_counter()
        sent = got = 0
        while got < n_parts:
            while sent < n_parts and sent - got < window:
                dealer.send_multipart([b"h" * HEADER_SIZE, buf, b"m" * MAC_SIZE], copy=False)
                sent += 1
            dealer.recv_multipart(copy=False)
            got += 1
        return time.perf_counter() - t0

    def ps(name: str):
        client = clients[name]

        def run_once() -> float:
            t0 = time.perf_counter()
            steps[name] += 1
            reqs = []
            for i in range(n_parts):  # window: at most `window` partitions outstanding
                reqs.append(client.submit(0, Op.PUSH, i, steps[name], buf, DType.FLOAT32))
                if len(reqs) >= window:
                    client.collect(reqs[-window:-window + 1])
            client.collect(reqs)
            return time.perf_counter() - t0
        return run_once

    cands = {"raw_pyzmq": raw, **{name: ps(name) for name in clients}}
    for fn in cands.values():
        fn()
    res = alternate(cands, reps)
    mac_gbps = _mac_speeds(buf)
    for c in clients.values():
        c.close()
    dealer.close(0)
    raw_proc.kill()
    raw_proc.wait()
    for srv in servers.values():
        srv.stop()
    gbps = {n: moved / r["median_s"] / 1e9 for n, r in res.items()}
    return {"partition_bytes": PARTITION, "partitions": n_parts, "in_flight": window,
            "GBps_push_plus_pull": {n: round(v, 4) for n, v in gbps.items()},
            "auth_cost_fraction": round(res["ps_auth"]["median_s"] / res["ps_insecure"]["median_s"] - 1, 4),
            "auth_cost_fraction_curve": round(res["ps_auth_curve"]["median_s"] / res["ps_insecure"]["median_s"] - 1, 4),
            "ps_insecure_fraction_of_raw": round(gbps["ps_insecure"] / gbps["raw_pyzmq"], 4),
            **mac_gbps}


def _mac_speeds(buf) -> dict[str, float]:
    """Single-core GB/s of the MAC the protocol uses (Signer: Poly1305) and of HMAC-SHA256 (v1's)."""
    import hashlib
    import hmac

    from trainlib.sync.ps.protocol import Signer

    signer, raw = Signer(TOKEN, "client"), b"\0" * 68
    out = {}
    for name, fn in (("hmac_sha256_GBps_one_core", lambda: hmac.new(TOKEN.encode(), buf, hashlib.sha256).digest()),
                     ("poly1305_GBps_one_core", lambda: signer.sign(raw, buf))):
        t0 = time.perf_counter()
        for _ in range(8):
            fn()
        out[name] = round(8 * PARTITION / (time.perf_counter() - t0) / 1e9, 3)
    return out


# -- the run ------------------------------------------------------------------------------------
def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="trainlib bench ps", description="PS vs all-reduce; --model: cost model only")
    p.add_argument("--model", action="store_true", help="print the cost model's prediction for a described cluster")
    p.add_argument("--nodes", type=int, default=16)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nic-gbps", type=float, default=100.0, help="per-node network bandwidth, Gbit/s")
    p.add_argument("--cpu-servers", type=int, default=0, help="extra CPU-only server machines (same NIC speed)")
    p.add_argument("--grad-mb", type=float, default=None, help="gradient MiB per step (default: the default GPT's)")
    a = p.parse_args(argv)
    for k in ("nodes", "gpus_per_node"):
        if getattr(a, k) < 1:
            p.error(f"--{k.replace('_', '-')}={getattr(a, k)} must be >= 1")
    if a.nic_gbps <= 0 or a.cpu_servers < 0:
        p.error(f"--nic-gbps={a.nic_gbps} must be > 0 and --cpu-servers={a.cpu_servers} >= 0")
    return a


def _default_gpt_mb() -> float:
    from trainlib.config import Config
    from trainlib.trainer import build_model

    return sum(p.numel() * p.element_size() for p in build_model(Config()).parameters()) / MB


def run(quick: bool, argv: list[str] | None = None) -> dict:
    args = _parse(argv or [])
    if args.model:
        grad_mb = args.grad_mb if args.grad_mb is not None else _default_gpt_mb()
        pred = predict(args.nodes, args.gpus_per_node, args.nic_gbps, args.cpu_servers, grad_mb)
        ded = f"{pred['ps_dedicated_ms']} ms" if pred["ps_dedicated_ms"] is not None else "n/a (no --cpu-servers)"
        print(f"{args.nodes} nodes x {args.gpus_per_node} GPUs, {args.nic_gbps:g} Gbit/s NICs, {grad_mb:.1f} MiB of "
              f"gradients per step: all-reduce {pred['allreduce_ms']} ms; PS colocated {pred['ps_colocated_ms']} ms; "
              f"PS on {args.cpu_servers} CPU servers {ded} -> {pred['winner']} (speed-up {pred['ps_speedup']}x); "
              f"PS beats all-reduce from {pred['cpu_servers_needed_to_beat_allreduce']} CPU servers on")
        return {"result_suffix": "-model", "prediction": pred, "summary": pred}
    from trainlib.sync.ps.launch import spawn_server
    from trainlib.testing import run_ranks

    reps = 3 if quick else 7
    tp = throughput(n_parts=4 if quick else 16, window=8, reps=reps)
    servers = [spawn_server(token=TOKEN) for _ in range(2)]
    noauth = [spawn_server(insecure=True) for _ in range(2)]
    # every worker is its own "node": each starts a colocated server (2 workers + 2 servers)
    env = {"LOCAL_WORLD_SIZE": "1", "TRAINLIB_PS_HOST": "127.0.0.1"}
    steps = {}
    try:
        for which in ("gpt", "wide_mlp"):
            r = run_ranks(step_times, N_WORKERS, [s.address for s in servers], [s.address for s in noauth], which,
                          reps, timeout_s=900,
                          env={**env, "LOCAL_RANK": "0"})[0]
            steps[which] = r
    finally:
        for s in servers + noauth:
            s.stop()
    bw = tp["GBps_push_plus_pull"]["raw_pyzmq"] * 1e9 / 2  # one direction
    for which, r in steps.items():
        med = r["median_s"]
        comm = {n: med[n] - med["local"] for n in med if n != "local"}
        m = r["grad_bytes"]
        pred = {"allreduce": t_allreduce(m, N_WORKERS, bw), "ps_colocated": t_ps(m, N_WORKERS, 2, bw),
                "ps_dedicated": t_ps(m, N_WORKERS, 2, bw), "ps_dedicated_noauth": t_ps(m, N_WORKERS, 2, bw)}
        r["comm_s_measured"] = {n: round(v, 5) for n, v in comm.items()}
        r["comm_s_predicted"] = {n: round(v, 5) for n, v in pred.items()}
        r["ps_dedicated_over_allreduce_step"] = round(med["ps_dedicated"] / med["allreduce"], 3)
        r["ps_colocated_over_allreduce_step"] = round(med["ps_colocated"] / med["allreduce"], 3)
        r["ps_noauth_over_allreduce_step"] = round(med["ps_dedicated_noauth"] / med["allreduce"], 3)
    summary = {"auth_cost_at_4MB": tp["auth_cost_fraction"], "auth_target_met": tp["auth_cost_fraction"] <= 0.20,
               "conn_auth_default": "plain", "auth_cost_at_4MB_curve": tp["auth_cost_fraction_curve"],
               "auth_target_met_curve": tp["auth_cost_fraction_curve"] <= 0.20,
               "ps_insecure_fraction_of_raw_pyzmq": tp["ps_insecure_fraction_of_raw"],
               **{f"{w}_ps_dedicated_over_allreduce": steps[w]["ps_dedicated_over_allreduce_step"] for w in steps},
               **{f"{w}_ps_colocated_over_allreduce": steps[w]["ps_colocated_over_allreduce_step"] for w in steps},
               **{f"{w}_ps_noauth_over_allreduce": steps[w]["ps_noauth_over_allreduce_step"] for w in steps}}
    return {"throughput": tp, "step_time": steps, "cost_model": {
        "bandwidth_GBps_one_direction_loopback": round(bw / 1e9, 4), "n_workers": N_WORKERS, "k_servers": 2,
        "formulas": {"allreduce": "2(n-1)/n * M/B", "ps": "max(M/B, n*M/(k*B))"},
        "example_clusters": [predict(16, 8, 100, 0, 1400), predict(16, 8, 100, 16, 1400), predict(2, 8, 100, 0, 1400)]},
        "summary": summary}


def plot(result: dict, path: str) -> None:
    if "step_time" not in result:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (which, r) in zip(axes, result["step_time"].items()):
        names = list(r["median_s"])
        ax.bar(names, [r["median_s"][n] * 1e3 for n in names], color=["grey", "C0", "C1", "C2", "C3"][: len(names)])
        ax.set_title(f"{which}: step time, 2 workers ({r['grad_bytes'] / MB:.1f} MiB grads)")
        ax.set_ylabel("ms (median)")
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":  # pragma: no cover
    print(run("--quick" in sys.argv, [a for a in sys.argv[1:] if a != "--quick"]))
