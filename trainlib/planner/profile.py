"""A calibration profile: the handful of machine figures the cost model needs, as a small JSON file.

    {"name": "...", "device": "cpu", "validated": true, "measured": {...conditions...},
     "values": {"matmul_fp32_flops": {"value": 9.1e10, "source": "measured: torch.mm ..."}, ...}}

Every value carries its source. Shipped profiles (trainlib/planner/profiles/*.json: h100, h200,
trn1, trn2) come from published figures and are marked "validated": false until a run on the
device replaces them; `trainlib plan --calibrate` writes a measured one for this machine.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .spec import PlanError

SHIPPED = Path(__file__).resolve().parent / "profiles"

# key -> what it means (the unit is in the name)
KEYS = {
    "matmul_fp32_flops": "dense matmul FLOP/s per device in fp32 (on model-sized shapes)",
    "matmul_bf16_flops": "dense matmul FLOP/s per device in bf16",
    "matmul_half_rows": "rows (tokens) at which a matmul reaches half its peak rate: rate(r) = peak * r / (r + this)",
    "matmul_half_width": "the model width at which a block's matmuls reach half the peak rate: rate x d / (d + this)",
    "matmul_weight_Bps": "bytes/s at which a matmul call streams its weight when the weight, not the FLOPs, sets "
                         "the pace (few rows on a wide layer: the GEMM packs the whole weight every call); 0: never",
    "mem_Bps": "memory copy bandwidth per device (bytes read + written / s): elementwise ops, the optimizer",
    "op_s": "fixed cost of one forward op with its backward (dispatch, autograd node, kernel launches)",
    "intra_alpha_s": "per-step latency of a collective inside a node (ring step; also a p2p message)",
    "intra_Bps": "link bandwidth inside a node per rank (bytes/s; a ring all-reduce takes 2(n-1)(a + M/(nB)))",
    "sync_alpha_s": "per-step latency of the data-parallel all-reduce inside a node (its transport: shm on CPU)",
    "sync_Bps": "link bandwidth of the data-parallel all-reduce inside a node per rank",
    "sync_dram_Bps": "the same all-reduce's bandwidth for the bytes past its first SYNC_CACHE_BYTES (8 MiB: they no "
                     "longer stay in the caches); 0: as sync_Bps",
    "inter_alpha_s": "per-step latency of a collective across nodes",
    "inter_efficiency": "share of the NIC's line rate a collective reaches across nodes (1/kappa of bench cluster; "
                        "bench plan sounds it on its emulated link)",
    "rs_ag_over_ar": "reduce-scatter + all-gather time over one all-reduce of the same bytes (ZeRO's sync) on the "
                     "collective library (gloo on CPU: ZeRO inside a node when compressed, TP/PP links)",
    "sync_rs_ag_over_ar": "the same ratio on the data-parallel transport inside a node (shm on CPU: uncompressed "
                          "ZeRO)",
    "ps_msg_s": "parameter server: fixed cost per partition message (push + pull)",
    "ps_sync_s": "parameter server: fixed cost per sync beyond its messages (the step's barrier, bookkeeping)",
    "ps_Bps": "parameter server: bytes/s one worker's push + pull moves when the network is not the limit",
    "pp_action_s": "pipeline runtime: fixed cost per schedule action (bookkeeping, tags, posting receives)",
    "grad_call_s": "fixed cost of one autograd call (ZB-H1's W makes one per parameter-owning module and "
                   "microbatch without checkpointing)",
    "overlap": "share of the data-parallel sync that hides behind the backward (0: none, 1: all but nothing)",
    "runtime_bytes": "bytes per device the runtime itself holds (CUDA context, NCCL/EFA buffers; 0 on CPU: "
                     "measured as a delta)",
    "compute_efficiency": "share of the matmul throughput a model's matmuls reach (shapes, fusion, launch gaps)",
    "recompute_share": "what full activation checkpointing's recomputation costs, as a share of the modelled forward",
    "checkpoint_call_s": "fixed cost of one block's full checkpointing per microbatch (torch's checkpoint: "
                         "its saved-tensor hooks, RNG state, the recompute's own graph), beyond the modelled "
                         "recomputation",
    "microbatch_block_s": "fixed cost per block of each microbatch after the first, beyond its modelled ops "
                          "(gradient accumulation: an add into every parameter's .grad, autograd's graph and the "
                          "loss per call): what splitting a step's batch costs past the FLOPs and the op count",
    "selective_op_s": "extra seconds per block op under selective checkpointing (its dispatch modes record the "
                      "forward and replay the recomputation, op by op)",
    "solo_speedup": "how much faster a rank computes while the others on its node idle (a pipeline bubble) than "
                    "when all compute at once (shared memory bandwidth and caches on CPU; 1 on accelerators)",
    "zero3_unit_s": "fixed cost of one ZeRO-3 unit's all-gather (forward and again backward, per microbatch)",
    "tp_collective_s": "fixed cost of one tensor-parallel all-reduce beyond the alpha-beta ring time",
    "dp_step_s": "fixed cost per step of data-parallel training (all-reduce, plain or sharded) over one device's "
                 "step and the sync's modelled bytes: the wrapper's gradient hooks and buckets, clipping across "
                 "ranks, the ranks meeting",
    "zero_step_s": "fixed cost per step of a sharded (ZeRO) data-parallel sync over a plain one: its slices, "
                   "master copies, epilogue and bookkeeping, beyond the bytes the model counts",
    "compress_collective_s": "fixed cost of one collective of a bf16-compressed ZeRO sync (each "
                             "bucket's reduce-scatter and all-gather, each ZeRO-3 unit's gathers: torch's "
                             "collectives, not the node's transport) beyond the alpha-beta time",
    "compress_overlap": "share of the backward behind which a compressed ZeRO sync's reduce-scatters (torch's "
                        "asynchronous collectives: gloo's thread on CPU) run inside a node",
    "compress_alpha_s": "per-step latency of a bf16-compressed gradient all-reduce (the collective library's own "
                        "16-bit path; gloo on CPU)",
    "compress_Bps": "link bandwidth of a bf16-compressed gradient all-reduce per rank (bytes on the wire / s)",
}
# Keys added after profiles were first shipped: a profile without them gets these values (what the cost
# model assumed before it had them), labelled so, instead of failing to load.
DEFAULTS = {"matmul_half_width": 0.0, "recompute_share": 1.0, "selective_op_s": 0.0, "solo_speedup": 1.0, "zero3_unit_s": 0.0,
            "tp_collective_s": 0.0, "compress_collective_s": 0.0, "zero_step_s": 0.0, "ps_sync_s": 0.0,
            "grad_call_s": 0.0, "matmul_weight_Bps": 0.0, "sync_dram_Bps": 0.0,
            "compress_overlap": 0.0, "checkpoint_call_s": 0.0, "microbatch_block_s": 0.0,
            "dp_step_s": 0.0}


@dataclass
class Profile:
    name: str
    device: str
    validated: bool
    values: dict[str, float]
    sources: dict[str, str]
    measured: dict = field(default_factory=dict)   # conditions of a measured profile: date, load, host

    def __post_init__(self):
        # a profile from before the compressed link was measured: the link's fp32 figures
        fallback = {**DEFAULTS, **{f"compress_{x}": self.values.get(f"intra_{x}") for x in ("alpha_s", "Bps")},
                    # before the transport's own ratio was measured the model applied the library's to it
                    "sync_rs_ag_over_ar": self.values.get("rs_ag_over_ar")}
        for k, v in fallback.items():
            if k not in self.values and v is not None:
                self.values[k] = v
                self.sources.setdefault(k, "default: not measured in this profile")
        missing = sorted(set(KEYS) - set(self.values))
        if missing:
            raise PlanError(f"profile {self.name!r} lacks {', '.join(missing)}; re-run trainlib plan --calibrate "
                            "or add them (trainlib/planner/profile.py lists each key)")
        bad = {k: v for k, v in self.values.items() if not (isinstance(v, (int, float)) and v >= 0)}
        if bad:
            raise PlanError(f"profile {self.name!r}: values must be numbers >= 0, got {bad}")

    def __getitem__(self, key: str) -> float:
        return float(self.values[key])

    def matmul_flops(self, precision: str, rows: float = float("inf"), width: float = float("inf")) -> float:
        """FLOP/s of a model's matmuls with `rows` tokens per call and inner width `width` (d_model; d_model / tp
        for the row-parallel linears under tensor parallelism, timing.matmul_seconds):
        small calls and narrow matrices do not fill the machine."""
        peak = self["matmul_fp32_flops" if precision == "fp32" else "matmul_bf16_flops"] * self["compute_efficiency"]
        if rows != float("inf"):
            peak *= rows / (rows + self["matmul_half_rows"])
        if width != float("inf"):
            peak *= width / (width + self["matmul_half_width"])
        return peak

    def to_json(self) -> dict:
        return {"name": self.name, "device": self.device, "validated": self.validated, "measured": self.measured,
                "values": {k: {"value": self.values[k], "source": self.sources.get(k, "")} for k in KEYS}}

    @staticmethod
    def from_json(data: dict, where: str = "profile") -> "Profile":
        try:
            values = {k: float(v["value"]) for k, v in data["values"].items()}
            sources = {k: str(v.get("source", "")) for k, v in data["values"].items()}
            return Profile(str(data["name"]), str(data["device"]), bool(data["validated"]), values, sources,
                           dict(data.get("measured", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"{where} is not a planner profile ({type(e).__name__}: {e}); write one with "
                            "`trainlib plan --calibrate --out PROFILE.json`") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def shipped_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.json"))


def load(name_or_path: str) -> Profile:
    """A shipped profile by name (h100, h200, trn1, trn2, cpu) or a JSON file by path."""
    p = Path(name_or_path)
    if not p.suffix and (SHIPPED / f"{name_or_path}.json").exists():
        p = SHIPPED / f"{name_or_path}.json"
    if not p.exists():
        raise PlanError(f"--device {name_or_path!r} is neither a shipped profile ({', '.join(shipped_names())}) nor a "
                        "profile file; run `trainlib plan --calibrate --out PROFILE.json` and pass --profile PROFILE.json")
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"profile {str(p)!r} cannot be read as JSON: {e}") from None
    return Profile.from_json(data, str(p))
