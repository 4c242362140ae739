"""`trainlib plan`: which layout, shard stage, schedule, recompute and sync backend for a model on a cluster.

    trainlib plan                                                   # the default GPT on 2 local CPU ranks
    trainlib plan --model.n_layer 8 --model.d_model 256              # the default GPT with trainlib train's flags
    trainlib plan --params 7e9 --layers 32 --hidden 4096 --seq 4096 --vocab 32000 \
        --nodes 16 --devices-per-node 8 --device h200 --global-batch 1024
    trainlib plan --model config.json --device trn1 --nodes 4 --devices-per-node 32 --emit pytorchjob
    trainlib plan --json                                             # the ranked list as JSON
    trainlib plan --calibrate --out cpu.json                        # measure this machine (~1 min)

Predictions come from a cost model (trainlib/planner/) fed by a profile: measured here (--calibrate,
or the shipped cpu.json) or from published figures (h100, h200, trn1, trn2: unvalidated).
"""
from __future__ import annotations

import argparse
import json
import sys

from .planner.layouts import Layout
from .planner.profile import load, shipped_names
from .planner.spec import ClusterSpec, ModelSpec, PlanError

# per device: (NIC Gbit/s per node, memory GiB per device, default precision); sources in the profiles
DEVICE_DEFAULTS = {"cpu": (10.0, None, "fp32"), "h100": (3200.0, 80.0, "bf16"), "h200": (3200.0, 141.0, "bf16"),
                   "trn1": (800.0, 16.0, "bf16"), "trn2": (3200.0, 24.0, "bf16")}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trainlib plan", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    g = p.add_argument_group("model (default: the default GPT, changed by --model.KEY=VALUE as in trainlib train)")
    g.add_argument("--model", metavar="CONFIG.json", help="a Hugging Face config.json (read as JSON, nothing downloaded)")
    g.add_argument("--params", type=float, help="parameter count (with --layers/--hidden/--seq/--vocab)")
    g.add_argument("--layers", type=int)
    g.add_argument("--hidden", type=int)
    g.add_argument("--heads", type=int, help="attention heads (default hidden / 128)")
    g.add_argument("--seq", type=int, help="sequence length (with --model: overrides max_position_embeddings)")
    g.add_argument("--vocab", type=int)
    c = p.add_argument_group("cluster")
    c.add_argument("--nodes", type=int, default=1)
    c.add_argument("--devices-per-node", type=int, default=2, help="ranks per node: GPUs, NeuronCores, CPU processes")
    c.add_argument("--device", default="cpu", help=f"profile: {', '.join(shipped_names())}, or use --profile")
    c.add_argument("--profile", metavar="PROFILE.json", help="a measured profile (trainlib plan --calibrate --out)")
    c.add_argument("--nic-gbps", type=float, help="NIC Gbit/s per node (default: the device's instance, cpu 10)")
    c.add_argument("--device-memory-gb", type=float, help="GiB per device (default: the device's; cpu: RAM / ranks)")
    c.add_argument("--global-batch", type=int, default=32, help="sequences per optimizer step (default 32)")
    c.add_argument("--precision", choices=("fp32", "bf16"), help="default fp32 on cpu, bf16 on accelerators")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="the ranked list as JSON")
    o.add_argument("--top", type=int, default=12, help="rows of the table (default 12; --json has all)")
    o.add_argument("--emit", metavar="KIND", help="print the winner as: train (a trainlib train command), or a "
                                                  "manifest kind of trainlib k8s (pytorchjob, mpijob, ...)")
    o.add_argument("--name", default="trainlib-plan", help="job name for --emit KIND")
    o.add_argument("--image", help="image for --emit KIND")
    k = p.add_argument_group("calibration")
    k.add_argument("--calibrate", action="store_true", help="measure this machine's profile (about two minutes)")
    k.add_argument("--out", metavar="PROFILE.json", help="where --calibrate writes (default: print it)")
    k.add_argument("--probe-model", action="store_true",
                   help="time the planned model's own step on one device here (CPU, the default GPT's --model.* "
                        "flags) and re-fit the profile's compute side to it, as `trainlib bench plan` validates")
    return p


def _host_memory_gb() -> float:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def model_from(args: argparse.Namespace, overrides: list[str]) -> ModelSpec:
    shapes = [args.params, args.layers, args.hidden, args.vocab]
    if args.model and (any(v is not None for v in shapes) or overrides):
        raise PlanError("--model CONFIG.json excludes --params/--layers/--hidden/--vocab and --model.* flags; give "
                        "one description of the model")
    if args.model:
        return ModelSpec.from_hf_config(args.model, seq=args.seq)
    if any(v is not None for v in shapes):
        missing = [n for n, v in zip(("--layers", "--hidden", "--vocab"), shapes[1:]) if v is None]
        if missing or args.seq is None:
            missing += [] if args.seq is not None else ["--seq"]
            raise PlanError(f"--params/--layers/--hidden/--seq/--vocab describe a model together: add "
                            f"{' '.join(missing)} (e.g. --layers 32 --hidden 4096 --seq 4096 --vocab 32000)")
        if overrides:
            raise PlanError(f"{overrides[0]}: --model.* flags change the default GPT; with --layers/--hidden use "
                            "those flags instead")
        return ModelSpec.from_shapes(args.params, args.layers, args.hidden, args.seq, args.vocab, args.heads)
    from .config import ConfigError, load_config, parse_overrides

    try:
        parsed = parse_overrides(overrides)
    except ConfigError:
        parsed = [("", "", "")]
    if any(section != "model" for section, _, _ in parsed):
        bad = next(o for o in overrides if not o.startswith("--model."))
        raise PlanError(f"unknown argument {bad!r}; the default GPT takes --model.KEY=VALUE (see trainlib train "
                        "--help), other flags are listed by trainlib plan --help")
    try:
        cfg = load_config(None, overrides)
    except ConfigError as e:
        raise PlanError(str(e)) from None
    if args.seq:
        raise PlanError("--seq applies to --layers/--hidden or --model CONFIG.json; for the default GPT use "
                        "--model.seq_len")
    return ModelSpec.gpt(cfg.model)


def cluster_from(args: argparse.Namespace) -> ClusterSpec:
    device = args.device
    if device not in DEVICE_DEFAULTS and not args.profile:
        raise PlanError(f"--device {device!r} is not one of {', '.join(DEVICE_DEFAULTS)}; for another machine pass "
                        "--profile PROFILE.json (trainlib plan --calibrate --out PROFILE.json)")
    nic, mem, _ = DEVICE_DEFAULTS.get(device, (10.0, None, "fp32"))
    if args.devices_per_node is not None and args.devices_per_node < 1:
        raise PlanError(f"--devices-per-node={args.devices_per_node} must be >= 1")
    if args.device_memory_gb is not None:
        mem = args.device_memory_gb
    elif mem is None:
        mem = _host_memory_gb() / max(1, args.devices_per_node)
    return ClusterSpec(args.nodes, args.devices_per_node, device, nic if args.nic_gbps is None else args.nic_gbps,
                       mem)


def _table(plans, global_batch: int, top: int, model: ModelSpec, cluster: ClusterSpec, profile) -> str:
    fit = [p for p in plans if p.fits]
    nofit = [p for p in plans if not p.fits]
    lines = [f"{model.name}: {model.params / 1e6:,.1f}M params on {cluster.nodes} x {cluster.devices_per_node} "
             f"{cluster.device} ({cluster.nic_gbps:g} Gbit/s per node, {cluster.device_memory_gb:.3g} GiB per device), "
             f"global batch {global_batch}; profile {profile.name}"
             f"{'' if profile.validated else ' (UNVALIDATED: published figures, not measured on the device)'}",
             f"{len(plans)} layouts: {len(fit)} fit, {len(nofit)} do not. PREDICTIONS of the cost model.", "",
             f"{'#':>3}  {'layout':<50} {'step ms':>10} {'peak GiB':>9}  why below the one above"]
    for i, p in enumerate(fit[:top], 1):
        lines.append(f"{i:>3}  {p.layout.label():<50} {p.step_s * 1e3:>10.3f} {p.peak_bytes / 2**30:>9.3f}  "
                     f"{p.reason}")
    if len(fit) > top:
        lines.append(f"     ... {len(fit) - top} more that fit (--top N, or --json)")
    if nofit:
        lines += ["", f"do not fit ({len(nofit)}), smallest first:"]
        for p in nofit[:max(3, top // 3)]:
            lines.append(f"     {p.layout.label():<50} {'-':>10} {p.peak_bytes / 2**30:>9.3f}  {p.reason}")
    if fit:
        lines += ["", "winner: " + " ".join(fit[0].layout.train_flags(global_batch))]
    return "\n".join(lines)


def _probe_model(model: ModelSpec, cluster: ClusterSpec, profile, global_batch: int, overrides: list[str]):
    """The profile with its compute side re-fitted to the model's own single-device step, measured here on
    a device's share of the batch at full data parallelism (calibrate.with_model_probe)."""
    import os

    from .config import load_config
    from .planner.calibrate import gpt_shape, measure_model_step, with_model_probe

    if profile.device != "cpu" or cluster.device != "cpu":
        raise PlanError(f"--probe-model times the model on this machine's CPU; the profile is for "
                        f"{profile.device!r} (drop --probe-model, or plan --device cpu with a measured profile)")
    cfg = load_config(None, overrides).model
    batch = max(1, global_batch // cluster.world)
    shape = gpt_shape(cfg, batch)
    ranks = max(1, min(cluster.devices_per_node, os.cpu_count() or 1))
    step_s = measure_model_step(shape, ranks)
    out = with_model_probe(profile, model, batch, step_s, f"re-fitted to {model.name}'s own step ({batch} "
                           f"sequences on one of {ranks} ranks at once)")
    print(f"trainlib plan: --probe-model: {model.name} took {step_s * 1e3:.1f} ms a step on one device; the "
          f"profile's compute side x{out.measured['model_slowdown']:.3f} slower", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = parser().parse_known_args(argv)
    try:
        if args.calibrate:
            from .planner.calibrate import calibrate

            prof = calibrate()
            if args.out:
                prof.save(args.out)
                print(f"trainlib plan: wrote {args.out}", file=sys.stderr)
            else:
                print(json.dumps(prof.to_json(), indent=2))
            return 0
        if args.out:
            raise PlanError("--out goes with --calibrate (where the measured profile is written)")
        if args.top < 1:
            raise PlanError(f"--top={args.top} must be >= 1")
        model = model_from(args, overrides)
        cluster = cluster_from(args)
        profile = load(args.profile or args.device)
        if args.probe_model:
            if args.model or any(v is not None for v in (args.params, args.layers, args.hidden, args.vocab)):
                raise PlanError("--probe-model builds the default GPT from its --model.* flags; a model given by "
                                "--params/--layers or a config.json is not built here (drop --probe-model)")
            profile = _probe_model(model, cluster, profile, args.global_batch, overrides)
        precision = args.precision or DEVICE_DEFAULTS.get(cluster.device, (0, 0, "fp32"))[2]
        from .planner.rank import rank

        plans = rank(model, cluster, profile, args.global_batch, precision)
        if not plans:
            raise PlanError(f"no valid layout for {model.name} on {cluster.world} devices with global batch "
                            f"{args.global_batch}: make the batch a multiple of the device count or of its divisors")
        best = next((p for p in plans if p.fits), None)
        if args.emit:
            if best is None:
                raise PlanError(f"--emit {args.emit}: no layout fits in {cluster.device_memory_gb:g} GiB per device; "
                                "add devices, lower --global-batch or raise --device-memory-gb")
            from .planner import emit

            if args.emit == "train":
                print(emit.train_command(best.layout, cluster, args.global_batch))
            else:
                sys.stdout.write(emit.manifest(args.emit, best.layout, cluster, args.global_batch, args.name,
                                               args.image))
            return 0
        if args.json:
            print(json.dumps({"model": model.name, "params": model.params, "profile": profile.name,
                              "validated": profile.validated, "global_batch": args.global_batch,
                              "cluster": {"nodes": cluster.nodes, "devices_per_node": cluster.devices_per_node,
                                          "device": cluster.device, "nic_gbps": cluster.nic_gbps,
                                          "device_memory_gb": cluster.device_memory_gb},
                              "plans": [p.to_json(args.global_batch) for p in plans]}, indent=1))
            return 0
        print(_table(plans, args.global_batch, args.top, model, cluster, profile))
        return 0
    except PlanError as e:
        print(f"trainlib plan: error: {e}", file=sys.stderr)
        return 1


__all__ = ["main", "Layout"]
