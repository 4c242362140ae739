"""Parameter server vs all-reduce: step time, push/pull throughput, and the cost model that says when PS wins.

    trainlib bench ps [--quick]
    trainlib bench ps --model --nodes 16 --gpus-per-node 8 --nic-gbps 100 --cpu-servers 16 [--grad-mb 1400]

1. Step time (2 workers, alternating, medians) on the default GPT (trainer defaults) and on a
   communication-heavy wide MLP (32 MiB of fp32 gradients, batch 8): no sync (compute only),
   all-reduce (gloo), PS colocated (each worker starts a server, as on 2 nodes), PS dedicated
   (2 server processes started here), and PS dedicated without authentication (--insecure servers). Communication time = step time - compute-only step time.
2. Push/pull throughput with 4 MiB partitions, 8 in flight: a raw pyzmq ROUTER that echoes each
   message (the transport's limit, no auth; and the same over CURVE: the floor of any CURVE job),
   the trainlib server with --insecure, and authenticated the two ways a server with a token can
   run (issue 17): per-direction Poly1305 message MACs plus the connection check at the ZeroMQ
   handshake, PLAIN (the default: a token-derived credential checked by ZAP, no per-byte cost) or
   CURVE (libzmq encrypts every byte). Wall time and the CPU both processes spend per round trip:
   on a machine with no idle core the auth cost is the MAC's CPU over the round trip's, and the
   floor is 4 Poly1305 passes (client signs, server verifies, server signs, client verifies),
   timed alone on one core (hot and cold), as is HMAC-SHA256 (v1's MAC) and libsodium's
   crypto_box (what libzmq's CURVE runs on every message).
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

import numpy as np
import torch
import torch.nn as nn

MB = 1024 * 1024
TOKEN = "bench-ps-token-" + "0123456789abcdef"
N_WORKERS = 2
PARTITION = 4 * MB
RAW_ECHO = """
import os, sys, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.setsockopt(zmq.LINGER, 0)
if len(sys.argv) > 1:  # CURVE: public and secret key; no ZAP handler, so libzmq admits any CURVE client
    s.curve_server = True; s.curve_publickey, s.curve_secretkey = sys.argv[1].encode(), sys.argv[2].encode()
port = s.bind_to_random_port("tcp://127.0.0.1"); print(port, flush=True)
parent = os.getppid()
while os.getppid() == parent:  # an orphan echo would spin forever
    if s.poll(1000):
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
def _raw_echo(curve_keys: tuple[bytes, bytes] | None = None):
    args = [k.decode() for k in curve_keys] if curve_keys else []
    proc = subprocess.Popen([sys.executable, "-c", RAW_ECHO, *args], stdout=subprocess.PIPE, text=True)
    return proc, f"127.0.0.1:{proc.stdout.readline().strip()}"


def _proc_cpu_s(pid: int) -> float:
    """CPU seconds a process has run, all its threads (libzmq's I/O thread included), to the
    nanosecond (schedstat; /proc/PID/stat counts 10 ms ticks, too coarse for a 4-partition run)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # a thread that just exited
            pass
    return total / 1e9


def _machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot: the share of the machine anything used."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)


def _timed(fn, server_pid: int, cpu: dict[str, list[float]], name: str):
    """fn's wall time, recording the CPU both ends spent (this process + the server) beside it."""
    def run_once() -> float:
        c0, s0 = time.process_time(), _proc_cpu_s(server_pid)
        wall = fn()
        cpu[name].append(time.process_time() - c0 + _proc_cpu_s(server_pid) - s0)
        return wall
    return run_once


def throughput(n_parts: int, window: int, reps: int) -> dict:
    """Push+pull of `n_parts` 4 MiB partitions, `window` in flight, alternating between: raw pyzmq
    echo (no security, and CURVE: the transport's floor for each), the trainlib server without
    authentication, and with it (PLAIN or CURVE at the connection, Poly1305 per message).

    Besides wall time, the CPU both processes spend per round trip (client process including its
    libzmq I/O thread + server process): when the machine has no idle core, wall time follows CPU
    time, and the auth cost is the MAC's CPU over the round trip's."""
    import zmq

    from trainlib.benchmarks.harness import alternate, median
    from trainlib.sync.ps.client import PSClient
    from trainlib.sync.ps.launch import spawn_server
    from trainlib.sync.ps.protocol import HEADER_SIZE, MAC_SIZE, DType, Op

    curve_pub, curve_sec = zmq.curve_keypair()
    raw = {"raw_pyzmq": _raw_echo(), "raw_pyzmq_curve": _raw_echo((curve_pub, curve_sec))}
    servers = {"ps_auth": spawn_server(token=TOKEN, extra=("--conn-auth", "plain")),
               "ps_auth_curve": spawn_server(token=TOKEN, extra=("--conn-auth", "curve")),
               "ps_insecure": spawn_server(insecure=True)}
    payload = torch.randn(PARTITION // 4)
    buf = payload.numpy()
    moved = 2 * n_parts * PARTITION  # push + pull bytes per measurement
    dealers = {}
    for name, (_, addr) in raw.items():
        d = zmq.Context.instance().socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        d.setsockopt(zmq.RCVTIMEO, 120_000)
        if name.endswith("curve"):
            client_pub, client_sec = zmq.curve_keypair()
            d.curve_serverkey, d.curve_publickey, d.curve_secretkey = curve_pub, client_pub, client_sec
        d.connect(f"tcp://{addr}")
        dealers[name] = d
    clients = {"ps_auth": PSClient([servers["ps_auth"].address], TOKEN, 0, 1, timeout_s=120, conn_auth="plain"),
               "ps_auth_curve": PSClient([servers["ps_auth_curve"].address], TOKEN, 0, 1, timeout_s=120,
                                         conn_auth="curve"),
               "ps_insecure": PSClient([servers["ps_insecure"].address], None, 0, 1, timeout_s=120)}
    for c in clients.values():
        c.hello()
    steps = {name: 0 for name in clients}

    def echo(name: str):
        dealer = dealers[name]

        def run_once() -> float:
            t0 = time.perf_counter()
            sent = got = 0
            while got < n_parts:
                while sent < n_parts and sent - got < window:
                    dealer.send_multipart([b"h" * HEADER_SIZE, buf, b"m" * MAC_SIZE], copy=False)
                    sent += 1
                dealer.recv_multipart(copy=False)
                got += 1
            return time.perf_counter() - t0
        return run_once

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

    cpu: dict[str, list[float]] = {}
    cands = {}
    for name in raw:
        cpu[name] = []
        cands[name] = _timed(echo(name), raw[name][0].pid, cpu, name)
    for name in clients:
        cpu[name] = []
        cands[name] = _timed(ps(name), servers[name].proc.pid, cpu, name)
    for fn in cands.values():
        fn()
    for ts in cpu.values():
        ts.clear()
    busy0 = _machine_busy()
    res = alternate(cands, reps)
    busy1 = _machine_busy()
    for c in clients.values():
        c.close()
    for d in dealers.values():
        d.close(0)
    for proc, _ in raw.values():
        proc.kill()
        proc.wait()
    for srv in servers.values():
        srv.stop()
    costs = _crypto_costs(buf)
    wall = {n: r["median_s"] for n, r in res.items()}
    cpu_ms = {n: round(median(ts) / n_parts * 1e3, 3) for n, ts in cpu.items()}  # per partition round trip
    gbps = {n: moved / t / 1e9 for n, t in wall.items()}
    # 4 MAC passes per round trip (client signs, server verifies, server signs, client verifies)
    mac_floor_ms = 4 * costs["poly1305_ms_per_4MiB_hot"]
    return {"partition_bytes": PARTITION, "partitions": n_parts, "in_flight": window, "reps": reps,
            "GBps_push_plus_pull": {n: round(v, 4) for n, v in gbps.items()},
            "median_s": {n: round(t, 5) for n, t in wall.items()},
            "all_s": {n: [round(t, 5) for t in r["all_s"]] for n, r in res.items()},
            "cpu_ms_per_round_trip": cpu_ms,
            "machine_busy_fraction": round((busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]), 3),
            "auth_cost_fraction": round(wall["ps_auth"] / wall["ps_insecure"] - 1, 4),
            "auth_cost_fraction_curve": round(wall["ps_auth_curve"] / wall["ps_insecure"] - 1, 4),
            "auth_cpu_fraction": round(cpu_ms["ps_auth"] / cpu_ms["ps_insecure"] - 1, 4),
            "auth_cpu_fraction_curve": round(cpu_ms["ps_auth_curve"] / cpu_ms["ps_insecure"] - 1, 4),
            "raw_curve_cost_fraction": round(wall["raw_pyzmq_curve"] / wall["raw_pyzmq"] - 1, 4),
            "raw_curve_cpu_fraction": round(cpu_ms["raw_pyzmq_curve"] / cpu_ms["raw_pyzmq"] - 1, 4),
            "mac_floor_ms_per_round_trip": round(mac_floor_ms, 3),
            "mac_floor_cpu_fraction": round(mac_floor_ms / cpu_ms["ps_insecure"], 4),
            "ps_insecure_fraction_of_raw": round(gbps["ps_insecure"] / gbps["raw_pyzmq"], 4),
            **costs}


def _crypto_costs(buf, n_cold: int = 64) -> dict[str, float | None]:
    """One core, one 4 MiB buffer: the MAC the protocol uses (Signer: Poly1305), HMAC-SHA256 (v1's),
    and libsodium's crypto_box_afternm (XSalsa20-Poly1305: what libzmq's CURVE runs per message).
    Poly1305 is timed hot (the same buffer again: compute only) and cold (n_cold distinct buffers,
    256 MiB, as a received frame is: the bytes come from memory). Times are this thread's CPU
    time, so other load on the machine does not count (it still slows the memory system)."""
    import hashlib
    import hmac

    from trainlib.sync.ps.protocol import Signer

    signer, raw = Signer(TOKEN, "client"), b"\0" * 68
    cold = [np.full(PARTITION, i, dtype=np.uint8) for i in range(n_cold)]

    def per_call_ms(fn, bufs) -> float:
        fn(bufs[0])
        t0 = time.thread_time()
        for b in bufs:
            fn(b)
        return (time.thread_time() - t0) / len(bufs) * 1e3

    hot = [buf] * n_cold
    out: dict[str, float | None] = {
        "poly1305_ms_per_4MiB_hot": round(min(per_call_ms(lambda b: signer.sign(raw, b), hot) for _ in range(3)), 4),
        "poly1305_ms_per_4MiB_cold": round(min(per_call_ms(lambda b: signer.sign(raw, b), cold) for _ in range(3)), 4),
        "memcpy_ms_per_4MiB_cold": round(min(per_call_ms(lambda b: b.copy(), cold) for _ in range(3)), 4),
        "hmac_sha256_ms_per_4MiB_hot": round(per_call_ms(lambda b: hmac.new(TOKEN.encode(), b, hashlib.sha256).digest(),
                                                         hot[:8]), 4),
        "curve_box_ms_per_4MiB_hot": _curve_box_ms(),
    }
    out["poly1305_GBps_one_core"] = round(PARTITION / out["poly1305_ms_per_4MiB_hot"] / 1e6, 3)
    out["hmac_sha256_GBps_one_core"] = round(PARTITION / out["hmac_sha256_ms_per_4MiB_hot"] / 1e6, 3)
    return out


def _curve_box_ms() -> float | None:
    """crypto_box_afternm over 4 MiB with the libsodium pyzmq's libzmq links (None where not found)."""
    import ctypes
    import glob

    import zmq

    libs = glob.glob(os.path.join(os.path.dirname(os.path.dirname(zmq.__file__)), "pyzmq.libs", "libsodium*"))
    try:
        sodium = ctypes.CDLL(libs[0] if libs else "libsodium.so.23")
    except OSError:
        return None
    sodium.sodium_init()
    key, nonce = os.urandom(32), os.urandom(24)
    src, dst = ctypes.create_string_buffer(PARTITION + 32), ctypes.create_string_buffer(PARTITION + 32)
    sodium.crypto_box_afternm(dst, src, ctypes.c_ulonglong(PARTITION + 32), nonce, key)
    t0 = time.thread_time()
    for _ in range(8):
        sodium.crypto_box_afternm(dst, src, ctypes.c_ulonglong(PARTITION + 32), nonce, key)
    return round((time.thread_time() - t0) / 8 * 1e3, 4)


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
    tp = throughput(n_parts=4 if quick else 16, window=8, reps=3 if quick else 9)
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
               "auth_cpu_cost_at_4MB": tp["auth_cpu_fraction"], "auth_cpu_cost_at_4MB_curve": tp["auth_cpu_fraction_curve"],
               "mac_floor_cpu_fraction": tp["mac_floor_cpu_fraction"],
               "raw_pyzmq_curve_cost": tp["raw_curve_cost_fraction"],
               "machine_busy_fraction": tp["machine_busy_fraction"],
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


def table_headline(s: dict) -> str:
    """This benchmark's line in `trainlib bench table` (benchmarks/README.md), from a result's summary."""
    from trainlib.benchmarks.harness import ratio_text

    if "ps_speedup" in s:  # `bench ps --model`: computed from a formula, nothing was timed
        return (f"PREDICTION of the cost model, not a measurement: {s['nodes']} nodes x {s['gpus_per_node']} GPUs at {s['nic_gbps']:g} Gb/s: all-reduce "
                f"{s['allreduce_ms']} ms, PS dedicated {s['ps_dedicated_ms']} ms ({s['winner']} wins)")
    return (f"authentication costs +{s['auth_cost_at_4MB'] * 100:.0f}% at 4 MB partitions; unauthenticated PS moves "
            f"{s['ps_insecure_fraction_of_raw_pyzmq']:.2f} of raw pyzmq; step time vs all-reduce: GPT "
            f"{ratio_text(s['gpt_ps_colocated_over_allreduce'])} colocated, wide MLP {ratio_text(s['wide_mlp_ps_colocated_over_allreduce'])}")
