"""`trainlib ckpt`: list, verify and export the checkpoints a run saved.

    trainlib ckpt ls DIR [--verify] [--json]        one line per step: layout, size, saved time, state
    trainlib ckpt verify DIR [--step N]             every rank's files against the manifest; exit 1 names each bad one
    trainlib ckpt export DIR --out model.safetensors [--step N] [--dtype fp32|bf16] [--master]

DIR is a run's --checkpoint.dir. Export writes one unsharded safetensors file under the full
model's parameter names, which plain torch code loads:

    from safetensors.torch import load_file
    model.load_state_dict(load_file("model.safetensors"))

Exit codes: 0 ok, 1 a bad value (one line naming it and the fix) or a damaged checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .checkpoint.store import CheckpointError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trainlib ckpt", description="List, verify and export checkpoints.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{ls,verify,export}")
    ls = sub.add_parser("ls", help="one line per checkpoint step: layout, size, saved time, verified or not "
                                   "(exit 1 when one is damaged)")
    ls.add_argument("dir", help="the run's --checkpoint.dir")
    ls.add_argument("--verify", action="store_true", help="hash every file against the manifest (reads everything)")
    ls.add_argument("--json", action="store_true", help="one JSON list instead of a table")
    ver = sub.add_parser("verify", help="check every rank's files against the manifest; exit 1 names each bad one")
    ver.add_argument("dir", help="the run's --checkpoint.dir")
    ver.add_argument("--step", type=int, help="only this step (default: every step)")
    ex = sub.add_parser("export", help="one consolidated safetensors file of the model weights")
    ex.add_argument("dir", help="the run's --checkpoint.dir")
    ex.add_argument("--out", required=True, help="the safetensors file to write (its directory must exist)")
    ex.add_argument("--step", type=int, help="the step to export (default: the one `latest` names)")
    ex.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="dtype of the exported weights")
    ex.add_argument("--master", action="store_true",
                    help="export the optimizer's fp32 master weights (mixed-precision runs) instead of the "
                         "weights the model computed with")
    return p


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _row(info) -> str:
    layout = (f"pp{info.mesh['pp']} dp{info.mesh['dp']} tp{info.mesh['tp']} shard={info.shard}"
              if info.mesh else "layout not recorded")
    saved = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.saved_unix)) if info.saved_unix else "?"
    if info.problems is None:
        state = "unverified"
    elif info.problems:
        state = f"damaged: {'; '.join(info.problems)}"
    else:
        state = "verified"
    world = f"world {info.world_size}" if info.world_size is not None else "world ?"
    return (f"step {info.step:>8}  {'latest' if info.latest else '      '}  {world}  {layout}  "
            f"{_size(info.bytes)}  {saved}  {state}")


def _ls(args) -> int:
    from .checkpoint import tools

    tools.resolve_step(args.dir, None)  # a missing directory or one without checkpoints: say so
    infos = tools.describe(args.dir, verify=args.verify)
    if args.json:
        print(json.dumps([i.as_json() for i in infos], indent=1))
    else:
        for i in infos:
            print(_row(i))
    return 1 if any(i.problems for i in infos) else 0


def _verify(args) -> int:
    from .checkpoint import tools
    from .checkpoint.store import latest_step, list_steps, step_dir

    first = tools.resolve_step(args.dir, args.step)
    steps = [first] if args.step is not None else list_steps(args.dir)
    damaged = 0
    for s in steps:
        problems = tools.verify_step(step_dir(args.dir, s))
        if problems:
            damaged += 1
            print(f"step {s}: damaged ({step_dir(args.dir, s)})")
            for line in problems:
                print(f"  {line}")
        else:
            print(f"step {s}: intact")
    latest = latest_step(args.dir)
    if latest not in list_steps(args.dir):   # loading then starts from the newest complete step: say so
        named = f"names step {latest}, which is not a complete checkpoint" if latest is not None else "is missing"
        print(f"trainlib ckpt verify: warning: {args.dir}/latest {named}; a resume starts from the newest intact "
              "step instead", file=sys.stderr)
    if damaged:
        print(f"trainlib ckpt verify: {damaged} of {len(steps)} checkpoint(s) under {args.dir} are damaged; loading "
              "skips them and falls back to the newest intact one", file=sys.stderr)
    return 1 if damaged else 0


def _progress(total: int):
    """A tqdm bar over ranks on stderr (None when tqdm is missing or TRAINLIB_NO_PROGRESS is set)."""
    if os.environ.get("TRAINLIB_NO_PROGRESS"):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="export", unit="rank", file=sys.stderr, dynamic_ncols=True)


def _export(args) -> int:
    from .checkpoint import tools
    from .checkpoint.store import step_dir

    tools.check_output(args.out)   # every bad value is named before the progress bar starts
    step = tools.resolve_step(args.dir, args.step)
    try:
        world = tools.read_manifest(step_dir(args.dir, step))["world_size"]
    except CheckpointError as e:
        raise CheckpointError(f"step {step} under {args.dir} is damaged: {e}; export an older step with --step "
                              "(`trainlib ckpt ls` lists them)") from None
    bar = _progress(world)
    try:
        result = tools.export(args.dir, args.out, step=step, dtype=args.dtype, master=args.master,
                              on_rank=(lambda _r: bar.update(1)) if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return {"ls": _ls, "verify": _verify, "export": _export}[args.cmd](args)
    except CheckpointError as e:
        print(f"trainlib ckpt {args.cmd}: error: {e}", file=sys.stderr)
        return 1
