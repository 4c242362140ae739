"""`trainlib cluster --nodes N [--nproc-per-node P] [--rate 1gbit] [--loss PCT] [--delay MS] [--] CMD ...`

Runs CMD (default `trainlib train`) as a PyTorchJob on N emulated nodes (trainlib.netcluster:
network namespaces on one machine, each link shaped), then tears the cluster down:

    sudo trainlib cluster --nodes 2 --rate 1gbit -- trainlib train --train.steps 50
    sudo trainlib cluster --nodes 2 --nproc-per-node 2 --loss 1 -- trainlib train --sync.kind ps

Each node's output is prefixed with its name; the exit code is the worst node's. Needs root.
"""
from __future__ import annotations

import argparse
import sys

from .netcluster import ClusterUnavailable, NetCluster, run_job, unavailable_reason


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="trainlib cluster", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=2, help="emulated nodes (default 2)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes per node (default 1)")
    p.add_argument("--rate", default="1gbit", help="each NIC's rate, tc syntax (default 1gbit); 'none' unshaped")
    p.add_argument("--loss", type=float, default=0.0, help="packet loss on every link, percent (default 0)")
    p.add_argument("--delay", default=None, help="one-way delay, e.g. 0.2ms (needs the kernel's sch_netem)")
    p.add_argument("--timeout", type=float, default=3600.0, help="kill the job after this many seconds")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="command (default: trainlib train)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    cmd = cmd or ["trainlib", "train"]
    if args.nodes < 1 or args.nproc_per_node < 1:
        print(f"trainlib cluster: --nodes={args.nodes} and --nproc-per-node={args.nproc_per_node} must be >= 1",
              file=sys.stderr)
        return 1
    reason = unavailable_reason()
    if reason:
        print(f"trainlib cluster: {reason}", file=sys.stderr)
        return 1
    rate = None if args.rate == "none" else args.rate
    try:
        with NetCluster(args.nodes, rate=rate, loss=args.loss, delay=args.delay) as c:
            print(f"trainlib cluster: {args.nodes} nodes ({', '.join(n.ip for n in c.nodes)}), rate "
                  f"{rate or 'unshaped'}, loss {args.loss}%: " + " ".join(cmd), file=sys.stderr, flush=True)
            res = run_job(c, cmd, nproc_per_node=args.nproc_per_node, timeout_s=args.timeout)
    except (ClusterUnavailable, ValueError) as e:
        print(f"trainlib cluster: {e}", file=sys.stderr)
        return 1
    for i, out in enumerate(res.outputs):
        for line in out.splitlines():
            print(f"[node{i}] {line}")
    print(f"trainlib cluster: exit codes {res.codes} after {res.wall_s:.1f} s", file=sys.stderr)
    bad = [c for c in res.codes if c != 0]
    return 0 if not bad else max(137 if c is None else c for c in bad)
