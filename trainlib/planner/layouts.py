"""Every valid layout for a model on a cluster, and each layout as `trainlib train` flags.

A layout is the full set of choices `trainlib plan` makes: pp x dp x tp, the ZeRO stage over dp,
the pipeline schedule and microbatch count (pp > 1), activation checkpointing and the gradient
sync (all-reduce with or without bf16 compression, or the parameter server). Validity follows
trainlib.validate (what `trainlib train` itself accepts): pp * dp * tp = world size; tp divides the
heads, the vocabulary and the MLP (Megatron splits them); every stage (pp x virtual) gets a pipeline
layer; the global batch splits over dp, then into microbatches (interleaved: a multiple of pp);
sharding and the parameter server exclude each other (the PS keeps whole fp32 gradients), as do
the PS and mixed precision. Choices a layout would ignore are not enumerated twice: with dp = 1
there is no sync and no shard; with pp = 1 no schedule.
"""
from __future__ import annotations

from dataclasses import dataclass

from .spec import ClusterSpec, ModelSpec, PlanError

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")
SHARDS = ("none", "optimizer", "gradients", "parameters")
ACS = ("none", "selective", "full")
MICROBATCH_FACTORS = (1, 2, 4, 8)   # microbatches = factor * pp (the trainer's default is 2 * pp)


@dataclass(frozen=True)
class Layout:
    pp: int
    dp: int
    tp: int
    shard: str = "none"
    schedule: str = "1f1b"
    microbatches: int = 1
    ac: str = "none"
    sync: str = "allreduce"       # allreduce | ps
    compress: str = "none"        # none | bf16 (all-reduce only)
    precision: str = "fp32"

    @property
    def virtual_stages(self) -> int:
        return 2 if self.pp > 1 and self.schedule == "interleaved" else 1

    def label(self) -> str:
        parts = [f"dp{self.dp}", f"tp{self.tp}", f"pp{self.pp}"]
        if self.pp > 1:
            parts.append(f"{self.schedule}/m{self.microbatches}")
        if self.shard != "none":
            parts.append({"optimizer": "zero1", "gradients": "zero2", "parameters": "zero3"}[self.shard])
        if self.ac != "none":
            parts.append(f"ac-{self.ac}")
        if self.dp > 1:
            parts.append("ps" if self.sync == "ps" else ("ar-bf16" if self.compress == "bf16" else "ar"))
        return " ".join(parts)

    def train_flags(self, global_batch: int) -> list[str]:
        """The `trainlib train` flags that run this layout (only flags it does not ignore)."""
        f = [f"--mesh.pp={self.pp}", f"--mesh.dp={self.dp}", f"--mesh.tp={self.tp}",
             f"--train.batch_size={global_batch}"]
        if self.pp > 1:
            f += [f"--mesh.schedule={self.schedule}", f"--mesh.microbatches={self.microbatches}"]
        if self.shard != "none":
            f.append(f"--dp.shard={self.shard}")
        if self.precision != "fp32":
            f.append(f"--train.precision={self.precision}")
        if self.ac != "none":
            f.append(f"--train.activation_checkpointing={self.ac}")
        if self.sync == "ps":
            f.append("--sync.kind=ps")
        elif self.compress != "none":
            f.append(f"--sync.compress={self.compress}")
        return f


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def mesh_shapes(model: ModelSpec, world: int) -> list[tuple[int, int, int]]:
    """(pp, dp, tp) with pp * dp * tp = world that the model can be split into."""
    out = []
    for tp in _divisors(world):
        if model.tp_divisors_ok(tp):
            continue
        for pp in _divisors(world // tp):
            if pp > model.pipeline_layers() or (pp > 1 and model.kind == "mlp"):
                continue
            out.append((pp, world // (tp * pp), tp))
    return out


def enumerate_layouts(model: ModelSpec, cluster: ClusterSpec, global_batch: int,
                      precision: str = "fp32") -> list[Layout]:
    """Every valid layout (see the module docstring), in a fixed order."""
    if global_batch < 1:
        raise PlanError(f"--global-batch={global_batch} must be >= 1 (sequences per optimizer step)")
    out: list[Layout] = []
    acs = ("none",) if model.kind == "mlp" else ACS
    for pp, dp, tp in mesh_shapes(model, cluster.world):
        if global_batch % dp:
            continue
        per_rank = global_batch // dp
        pipes: list[tuple[str, int]] = [("1f1b", 1)]
        if pp > 1:
            pipes = []
            for s in SCHEDULES:
                v = 2 if s == "interleaved" else 1
                if pp * v > model.pipeline_layers():
                    continue
                for k in MICROBATCH_FACTORS:
                    m = k * pp
                    if per_rank % m == 0 and not (s == "interleaved" and m % pp):
                        pipes.append((s, m))
        syncs: list[tuple[str, str, str]] = [("none", "allreduce", "none")]
        if dp > 1:
            syncs = [(sh, "allreduce", c) for sh in SHARDS for c in ("none", "bf16")]
            if precision == "fp32":
                syncs.append(("none", "ps", "none"))
        for schedule, m in pipes:
            for shard, sync, compress in syncs:
                for ac in acs:
                    out.append(Layout(pp, dp, tp, shard, schedule, m, ac, sync, compress, precision))
    return out
