"""What the planner plans for: a model (its shapes) and a cluster (devices, links, memory).

    model = ModelSpec.gpt(GPTConfig())                      # the default GPT's shapes
    model = ModelSpec.from_hf_config("config.json")          # a Hugging Face config.json, read as JSON
    model = ModelSpec.from_shapes(params=7e9, layers=32, hidden=4096, seq=4096, vocab=32000)

Only shapes matter here: parameter counts per pipeline layer (for memory and stage balance),
matmul FLOPs per token (for time) and saved activations per token (for memory). Nothing is built.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

KINDS = ("gpt", "llama", "mlp")


class PlanError(ValueError):
    """A bad planner input; the message names the value and the fix."""


@dataclass(frozen=True)
class ModelSpec:
    """kind: "gpt" (trainlib's default GPT: learned positions, LayerNorm, 4d GELU MLP, untied head),
    "llama" (RMSNorm, SwiGLU MLP of width ffn, grouped KV heads, no biases) or "mlp" (the wide-MLP
    benchmark: `n_layer` Linear(d_model, d_model) layers with ReLU, one sample of d_model per "token")."""
    kind: str
    n_layer: int
    d_model: int
    n_head: int = 1
    seq_len: int = 1
    vocab_size: int = 0
    ffn: int = 0                  # MLP width (gpt: 4 * d_model)
    n_kv_head: int = 0            # llama: grouped-query KV heads (0 = n_head)
    tied: bool = False            # llama: LM head shares the embedding
    params_override: int = 0      # --params N: the count to use for memory when the shapes are a sketch
    name: str = "model"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise PlanError(f"model kind {self.kind!r} is not one of {', '.join(KINDS)}")
        for key in ("n_layer", "d_model", "n_head", "seq_len"):
            if getattr(self, key) < 1:
                raise PlanError(f"{key}={getattr(self, key)} must be >= 1")
        if self.kind != "mlp" and self.d_model % self.n_head:
            raise PlanError(f"hidden={self.d_model} is not divisible by heads={self.n_head}; pick heads among the "
                            f"divisors of {self.d_model}")
        if self.kind != "mlp" and self.vocab_size < 1:
            raise PlanError(f"vocab={self.vocab_size} must be >= 1")

    # -- constructors ------------------------------------------------------------------------------
    @staticmethod
    def gpt(cfg, name: str = "default GPT") -> "ModelSpec":
        """From trainlib.models.gpt.GPTConfig (or config.ModelConfig)."""
        return ModelSpec("gpt", cfg.n_layer, cfg.d_model, cfg.n_head, cfg.seq_len, cfg.vocab_size,
                         ffn=4 * cfg.d_model, name=name)

    @staticmethod
    def mlp(width: int, depth: int, name: str = "wide MLP") -> "ModelSpec":
        return ModelSpec("mlp", depth, width, name=name)

    @staticmethod
    def from_shapes(params: float | None, layers: int, hidden: int, seq: int, vocab: int, heads: int | None = None,
                    ffn: int | None = None) -> "ModelSpec":
        """--params/--layers/--hidden/--seq/--vocab: a GPT-shaped model (heads = hidden / 128, at least 1)."""
        heads = heads or max(1, hidden // 128)
        while hidden % heads:
            heads -= 1
        spec = ModelSpec("gpt", layers, hidden, heads, seq, vocab, ffn=ffn or 4 * hidden, name="--layers/--hidden")
        if params:
            if params < 1:
                raise PlanError(f"--params {params} must be >= 1 (a parameter count, e.g. 7e9)")
            spec = replace(spec, params_override=int(params))
        return spec

    @staticmethod
    def from_hf_config(path: str, seq: int | None = None) -> "ModelSpec":
        """A Hugging Face config.json (Llama/Mistral/Qwen style, or GPT-2 style), read as plain JSON."""
        p = Path(path)
        try:
            cfg = json.loads(p.read_text())
        except FileNotFoundError:
            raise PlanError(f"--model {path!r}: no such file; give a config.json path or omit --model for the "
                            "default GPT") from None
        except (OSError, json.JSONDecodeError) as e:
            raise PlanError(f"--model {path!r} is not a readable JSON config.json: {e}") from None
        if not isinstance(cfg, dict):
            raise PlanError(f"--model {path!r}: expected a JSON object (a Hugging Face config.json)")

        def get(*keys: str, default=None):
            for k in keys:
                if k in cfg:
                    return cfg[k]
            if default is None:
                raise PlanError(f"--model {path!r} has none of {', '.join(keys)}; is it a decoder's config.json?")
            return default

        hidden = int(get("hidden_size", "n_embd", "d_model"))
        layers = int(get("num_hidden_layers", "n_layer", "num_layers"))
        heads = int(get("num_attention_heads", "n_head"))
        vocab = int(get("vocab_size"))
        max_seq = int(get("max_position_embeddings", "n_positions", "n_ctx", default=2048))
        seq = seq or max_seq
        if "intermediate_size" in cfg:   # gated (SwiGLU) MLP, RMSNorm: the Llama family
            return ModelSpec("llama", layers, hidden, heads, seq, vocab, ffn=int(cfg["intermediate_size"]),
                             n_kv_head=int(cfg.get("num_key_value_heads", heads)),
                             tied=bool(cfg.get("tie_word_embeddings", False)), name=p.name)
        return ModelSpec("gpt", layers, hidden, heads, seq, vocab, ffn=int(cfg.get("n_inner") or 4 * hidden),
                         name=p.name)

    # -- shapes ------------------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    def block_params(self) -> int:
        d, f = self.d_model, self.ffn
        if self.kind == "mlp":
            return d * d + d
        if self.kind == "llama":
            kv = self.kv_heads * (d // self.n_head)
            return 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
        return 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d   # qkv, proj, fc, proj, 2 LayerNorms

    def layer_params(self) -> list[int]:
        """Parameters of each pipeline layer: [embed, *blocks, final] (mlp: the blocks alone)."""
        d, v = self.d_model, self.vocab_size
        blocks = [self.block_params()] * self.n_layer
        if self.kind == "mlp":
            return blocks
        if self.kind == "llama":
            return [v * d, *blocks, d + (0 if self.tied else v * d)]
        return [v * d + self.seq_len * d, *blocks, 2 * d + d * v]

    @property
    def params(self) -> int:
        return self.params_override or sum(self.layer_params())

    @property
    def param_scale(self) -> float:
        """--params N over the shapes' own count: memory scales by it, stage balance does not."""
        return self.params / sum(self.layer_params())

    def matmul_flops_per_token(self, layer: int) -> float:
        """Forward FLOPs per token of pipeline layer `layer` (2 per multiply-add, attention included)."""
        flops = 2.0 * self.matmul_weights(layer)
        if self.kind == "mlp" or layer in (0, self.n_layer + 1):
            return flops
        return flops + 2.0 * self.seq_len * self.d_model    # QK^T and AV over a causal window: 2 * (2 t d) / 2

    def row_parallel_share(self, layer: int) -> float:
        """The share of pipeline layer `layer`'s forward matmul FLOPs in Megatron's row-parallel linears
        (attention's output projection, the MLP's down projection): under tensor parallelism their inner
        dimension is split (d/tp, ffn/tp), while the column-parallel ones (QKV, the MLP's up and gate
        projections, the vocabulary-parallel head) and attention's per-head products keep theirs."""
        if self.kind == "mlp" or layer in (0, self.n_layer + 1):
            return 0.0
        d = self.d_model
        return (d * d + self.ffn * d) / (self.matmul_flops_per_token(layer) / 2.0)

    def matmul_weights(self, layer: int) -> int:
        """Weight elements the matmuls of pipeline layer `layer` multiply by (biases and norms aside)."""
        d = self.d_model
        if self.kind == "mlp":
            return d * d
        if layer == 0:
            return 0
        if layer == self.n_layer + 1:
            return d * self.vocab_size
        return self.block_params() - (2 * d if self.kind == "llama" else 9 * d + self.ffn)

    def tp_divisors_ok(self, tp: int) -> str | None:
        """Why tensor parallelism of size tp cannot split this model, or None."""
        if tp == 1:
            return None
        if self.kind == "mlp":
            return "the wide MLP has no tensor-parallel plan"
        for key, n in (("heads", self.n_head), ("vocab", self.vocab_size), ("ffn", self.ffn)):
            if n % tp:
                return f"{key}={n} is not divisible by tp={tp}"
        if self.kind == "llama" and self.kv_heads % tp:
            return f"kv_heads={self.kv_heads} is not divisible by tp={tp}"
        return None

    def pipeline_layers(self) -> int:
        return len(self.layer_params())


@dataclass(frozen=True)
class ClusterSpec:
    nodes: int
    devices_per_node: int
    device: str                   # a profile name: cpu | h100 | h200 | trn1 | trn2 | a path
    nic_gbps: float               # per node
    device_memory_gb: float       # per device (GiB)
    # a token-bucket NIC (the emulated cluster's tbf): bytes that leave at once after an idle gap long
    # enough to refill them; 0 for a real NIC, which sends everything at line rate
    nic_burst_bytes: float = 0.0

    def __post_init__(self):
        for key in ("nodes", "devices_per_node"):
            if getattr(self, key) < 1:
                raise PlanError(f"--{key.replace('_', '-')}={getattr(self, key)} must be >= 1")
        if not self.nic_gbps > 0:
            raise PlanError(f"--nic-gbps={self.nic_gbps} must be > 0 (Gbit/s per node, e.g. 3200 for p5's EFA)")
        if self.nic_burst_bytes < 0:
            raise PlanError(f"nic_burst_bytes={self.nic_burst_bytes} must be >= 0 (0: a NIC at line rate)")
        if not self.device_memory_gb > 0:
            raise PlanError(f"--device-memory-gb={self.device_memory_gb} must be > 0 (GiB per device, e.g. 141 "
                            "for an H200)")

    @property
    def world(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def memory_bytes(self) -> int:
        return int(self.device_memory_gb * 2**30)

    @property
    def nic_Bps(self) -> float:
        return self.nic_gbps * 1e9 / 8
