"""trainlib plan: the cost model's formulas against hand-computed cases and a real model, the layout
enumeration against a brute force over trainlib's own validator, the profile round trip, and the CLI."""
from __future__ import annotations

import itertools
import json
import math

import statistics

import pytest
import torch

from trainlib.benchmarks.bench_ps import t_allreduce
from trainlib.config import ConfigError, ModelConfig, load_config
from trainlib.pipeline.schedules import theory_bubble
from trainlib.plan_cli import main
from trainlib.planner.layouts import MICROBATCH_FACTORS, SCHEDULES, SHARDS, Layout, enumerate_layouts
from trainlib.planner.memory import peak_memory, stages_of
from trainlib.planner.profile import KEYS, Profile, load, shipped_names
from trainlib.planner.spec import ClusterSpec, ModelSpec, PlanError
from trainlib.planner.timing import dp_sync_time, matmul_seconds, step_time
from trainlib.validate import check_batch, check_model_over_mesh, check_pipeline, mesh_layout, not_applicable

GPT = ModelSpec.gpt(ModelConfig())        # 4 blocks, d 128, seq 128, vocab 256: 875,264 parameters
ONE_NODE = ClusterSpec(1, 2, "cpu", 10.0, 8.0)


def profile(**over: float) -> Profile:
    values = dict(matmul_fp32_flops=1e9, matmul_bf16_flops=2e9, matmul_half_rows=0.0, mem_Bps=1e9, op_s=0.0, intra_alpha_s=1e-4,
                  intra_Bps=1e9, sync_alpha_s=1e-5, sync_Bps=4e9, inter_alpha_s=1e-4, inter_efficiency=0.5,
                  rs_ag_over_ar=2.0, ps_msg_s=1e-3, ps_Bps=5e8, pp_action_s=1e-3, overlap=0.0, runtime_bytes=0.0,
                  compute_efficiency=1.0)
    values.update(over)
    return Profile("test", "cpu", False, values, {k: "test" for k in values})


# -- shapes --------------------------------------------------------------------------------------------
def test_parameter_counts_match_the_models():
    from trainlib.models.gpt import GPT as GPTModel

    for cfg in (ModelConfig(), ModelConfig(n_layer=2, d_model=64, n_head=2, seq_len=32, vocab_size=512)):
        real = [sum(p.numel() for p in layer.parameters()) for layer in GPTModel(cfg).as_layers()]
        assert ModelSpec.gpt(cfg).layer_params() == real


def test_hf_llama_config_counts_llama2_7b(tmp_path):
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
           "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "vocab_size": 32000,
           "max_position_embeddings": 4096, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = ModelSpec.from_hf_config(str(tmp_path / "config.json"))
    assert spec.kind == "llama" and spec.params == 6_738_415_616   # Llama-2-7B's published count


# -- memory --------------------------------------------------------------------------------------------
def test_memory_hand_computed():
    # dp2, ZeRO-1, fp32 + AdamW: 4 + 4 + 8/2 = 12 bytes per parameter
    m = peak_memory(GPT, Layout(1, 2, 1, shard="optimizer"), global_batch=8)
    assert m.states == 875_264 * 12
    # 4 sequences x 128 tokens per rank; per block 16 d fp32 = 8192 B/token; logits 256 x 4; embed 2 d x 4
    assert m.activations == 512 * (4 * 8192 + 256 * 4 + 2 * 128 * 4)
    # pp2: [embed, b0, b1] | [b2, b3, final] by parameter count; the larger stage holds 445,696 params
    assert stages_of(GPT, Layout(2, 1, 1, microbatches=2)) == [[[0, 1, 2]], [[3, 4, 5]]]
    assert peak_memory(GPT, Layout(2, 1, 1, microbatches=2), 8).states == 445_696 * 16
    # tp2 splits the matrices and the vocabulary, not the LayerNorms, row biases or positions
    tp2 = peak_memory(GPT, Layout(1, 1, 2), 8).params
    d, v = 128, 256
    assert tp2 == (v * d / 2 + 128 * d) + 4 * (6 * d + (198_272 - 6 * d) / 2) + (2 * d + d * v / 2)


def test_shared_memory_pages_per_stage():
    # a CPU node's shm transport: a rank touches its 1/n chunk of each peer's buffers (n = 2 here: half)
    from trainlib.planner.memory import _shm_pages, largest_bucket_bytes
    from trainlib.planner.rank import shm_ranks

    n, layers = 875_264, list(range(6))
    m = n * 4
    pages = {shard: _shm_pages(GPT, Layout(1, 2, 1, shard=shard), layers, n, 2)
             for shard in ("none", "optimizer", "gradients", "parameters")}
    assert pages["none"] == m / 2                       # the buckets
    assert pages["optimizer"] == m                      # the gradients' and the parameters' buffers
    # backward order: the head (256 x 128) and its LayerNorms, then block 3 (norms and biases 1,664,
    # 2 x 128 x 512, 128 x 128, 3 x 128 x 128) and block 2's 1,664 fill the 1 MiB first bucket (262,144
    # elements); the rest goes in one 25 MiB bucket
    first = 256 + 32_768 + 1_664 + 2 * 65_536 + 16_384 + 49_152 + 1_664
    assert largest_bucket_bytes(GPT, Layout(1, 2, 1, shard="gradients"), layers) == (n - first) * 4
    slot = (n - first) * 4
    assert pages["gradients"] == 2 * slot + min(m, 2 * slot) / 2 + m / 2
    unit = 198_272 * 4                                  # ZeRO-3: a slot per unit, the largest a block
    assert pages["parameters"] == 2 * unit + 2 * unit / 2 + m / 2
    assert _shm_pages(GPT, Layout(1, 2, 1, shard="gradients", compress="bf16"), layers, n, 1) == 0.0
    assert shm_ranks(Layout(1, 2, 1, shard="gradients"), ONE_NODE) == 2
    assert shm_ranks(Layout(1, 2, 1, shard="gradients", compress="bf16"), ONE_NODE) == 1     # gloo then
    assert shm_ranks(Layout(1, 2, 1, shard="gradients"), ClusterSpec(2, 1, "cpu", 8.0, 8.0)) == 1


def test_backward_and_optimizer_step_peak_apart():
    # the wide MLP at dp=2 on one node: states + shared pages, then the larger of the backward (a fresh
    # 16 MiB gradient beside tiny activations) and the optimizer step (CPU AdamW: 2 x the largest tensor;
    # foreach: one parameter-sized buffer)
    mlp, d = ModelSpec.mlp(2048, 3), 2048
    p = 3 * (d * d + d)
    acts = peak_memory(mlp, Layout(1, 2, 1), 16).activations
    cpu = peak_memory(mlp, Layout(1, 2, 1), 16, shm_ranks=2)
    assert cpu.peak == pytest.approx(16 * p + p * 4 / 2 + max(acts + d * d * 4, 2 * d * d * 4))
    gpu = peak_memory(mlp, Layout(1, 2, 1), 16, accelerator=True)
    assert gpu.peak == pytest.approx(16 * p + max(acts + d * d * 4, p * 4))
    # the default GPT: activations dominate, so the optimizer's temporary does not add to the peak
    plain = peak_memory(GPT, Layout(1, 2, 1), 8)
    assert plain.peak == pytest.approx(plain.states + plain.activations + 128 * 512 * 4 + 2 * 512 * 256 * 4)


def test_pipeline_holds_the_buffers_it_sent():
    """A pipeline rank keeps every tensor it sends until the step ends (hand-counted per schedule), not the
    ones it receives (the next stage's input, counted with its activations, or a gradient used once)."""
    from trainlib.planner.memory import schedule_facts

    # 1F1B pp=2 m=8: rank 0 sends 8 activations, rank 1 8 gradients; interleaved adds the chunk boundaries
    # (rank 0: stage 0's and 2's forwards, stage 2's backwards); ZB-H1 sends at I, not at W
    assert schedule_facts("1f1b", 2, 8)[3] == (8, 8)
    assert schedule_facts("interleaved", 2, 8)[3] == (24, 24)
    assert schedule_facts("zb-h1", 2, 8)[3] == (8, 8)
    assert schedule_facts("1f1b", 4, 8)[3] == (8, 16, 16, 8)      # a middle rank sends both ways
    # the ones sent by each moment count (SENT): interleaved pp=2 m=2, rank 0 (F0 F0 F2 F2 B2 B2 B0 B0 in
    # stage terms) peaks with 4 forwards sent, its 2 gradients follow; the step's end keeps all 6
    from trainlib.planner.memory import FORWARDED, GRADS, SENT, in_flight

    r0, _ = in_flight(Layout(2, 1, 1, schedule="interleaved", microbatches=2))
    assert {SENT: 4, (0, FORWARDED): 2, (2, FORWARDED): 2} in r0 and {SENT: 6, GRADS: 1} in r0
    # GPipe m=2: rank 0 has sent both activations at its peak; rank 1 (the last stage) none until B
    g0, g1 = in_flight(Layout(2, 1, 1, schedule="gpipe", microbatches=2))
    assert {SENT: 2, (0, FORWARDED): 2} in g0 and {(1, FORWARDED): 2} in g1


def test_split_backward_holds_captured_gradients_only_past_input_grad():
    """ZB-H1 pp=2 m=2, per rank (rank 0: F0 F1 I0 W0 I1 W1; rank 1: F0 I0 F1 I1 W0 W1): rank 0 peaks
    with one microbatch past I and one forwarded, rank 1 with both past I; both at their first W, whose
    stage-sized gradients come beside the .grad they are cloned into (GRADS: 2)."""
    from trainlib.planner.memory import FORWARDED, GRADS, INPUT_GRAD_DONE, SENT, in_flight, rank_memory

    zb = Layout(2, 1, 1, schedule="zb-h1", microbatches=2)
    r0, r1 = in_flight(zb)
    # rank 0 has sent its 2 activations by then (F), rank 1 its 2 input gradients (I)
    assert {(0, INPUT_GRAD_DONE): 1, (0, FORWARDED): 1, GRADS: 2, SENT: 2} in r0
    assert {(1, INPUT_GRAD_DONE): 2, GRADS: 2, SENT: 2} in r1
    # the same 2 blocks per rank: rank 1 holds d + vocab's captured gradients more per token (final norm,
    # logits) and the logits; per block a microbatch past I holds 16 d + (4 d + 3 d + f) = 27 d (GPT, f = 4 d)
    d, tokens = 128, 8 // 2 * 128
    a0, a1 = (r.activations for r in rank_memory(GPT, zb, 8))
    block = 2 * tokens * 4
    forwarded0 = 16 * d * block + 2 * d * tokens * 4                   # stage 0 also keeps its embeddings' 2 d
    assert a0 == pytest.approx(forwarded0 + (forwarded0 + 11 * d * block))
    last = 27 * d * block + tokens * 256 * 4 + tokens * (d + 256) * 4
    assert a1 == pytest.approx(2 * last)
    # an MLP's blocks hold their 2 d either way: two microbatches of 4 rows in flight on each rank, 2 blocks each
    mlp = rank_memory(ModelSpec.mlp(1024, 4), Layout(2, 1, 1, schedule="zb-h1", microbatches=4), 16)
    assert [r.activations for r in mlp] == [2 * 2 * 2 * 1024 * 4 * 4] * 2


def test_gradients_exist_at_the_peak_only_after_a_backward_without_data_parallelism():
    """GPipe pp=2 m=4 peaks on rank 0 with 4 forwarded and no gradients; 1F1B m=4 with 2 forwarded after its
    first backward, gradients made. Without a data-parallel wrapper holding them from the build on, a peak
    before any backward lacks all but the last layer's (tp=2, pp=1: hand-computed below)."""
    from trainlib.planner.memory import FORWARDED, GRADS, SENT, in_flight, local_layer_params

    assert {(0, FORWARDED): 4, SENT: 4} in in_flight(Layout(2, 1, 1, schedule="gpipe", microbatches=4))[0]
    assert {(0, FORWARDED): 2, GRADS: 1, SENT: 4} in in_flight(Layout(2, 1, 1, schedule="1f1b", microbatches=4))[0]
    # the default GPT at tp=2, full checkpointing, 8 x 128 tokens: d x tokens x 4 B = 0.5 MiB ("d")
    mib, d_unit = 2**20, 0.5 * 2**20
    m = peak_memory(GPT, Layout(1, 1, 2, ac="full"), 8)
    acts = 4 * d_unit + 2 * d_unit + 1024 * 128 * 4       # 4 block inputs, the embeddings' 2 d, logits (v/2)
    assert m.activations == acts == 3.5 * mib
    # the last block's backward: the whole "none" set rebuilt (4 d + (4 d + 2 f) / 2 = 10 d) and f / 2 of
    # gradients (2 d): 6 MiB, less the logits freed by then (0.5 MiB); their 2 x 0.5 MiB at the start is less
    block = 12 * d_unit - 0.5 * mib
    biggest = 128 * 512 // 2 * 4                            # the fc weight's gradient, d x f / 2
    grads_late = (m.params - local_layer_params(GPT, 5, 2)) * 4   # all but the final norm's and the head's
    assert m.peak - m.states - m.runtime == pytest.approx(acts + block + biggest - grads_late)
    # with data parallelism (dp=2, same tokens per rank at batch 16) the buckets hold every gradient throughout
    dp = peak_memory(GPT, Layout(1, 2, 1, ac="full"), 16)
    assert dp.peak - dp.states - dp.runtime == pytest.approx(
        dp.activations + 20 * d_unit - 1024 * 256 * 4 + 128 * 512 * 4)   # 16 d + f rebuilt, logits v


def test_in_flight_microbatches_follow_the_schedule():
    base = peak_memory(GPT, Layout(2, 1, 1, schedule="1f1b", microbatches=8), 16).activations
    gpipe = peak_memory(GPT, Layout(2, 1, 1, schedule="gpipe", microbatches=8), 16).activations
    # 1F1B holds at most pp = 2 microbatches on rank 0, GPipe all 8
    assert gpipe / base == pytest.approx(4.0, rel=0.05)
    # interleaved pp=2 m=4: rank 0's stage 0 peaks at 4 microbatches and its stage 2 at 2, but not at once
    from trainlib.planner.memory import FORWARDED, in_flight

    snaps = in_flight(Layout(2, 1, 1, schedule="interleaved", microbatches=4))[0]
    first, third = (0, FORWARDED), (2, FORWARDED)
    assert max(s.get(first, 0) for s in snaps) == 4 and max(s.get(third, 0) for s in snaps) == 2
    assert max(s.get(first, 0) + s.get(third, 0) for s in snaps) < 6


@pytest.mark.parametrize("ac", ["none", "selective", "full"])
def test_activation_counts_against_a_real_gpt(ac):
    """The per-block counts equal what autograd keeps in trainlib's GPT (storage tracker), within 3%."""
    from trainlib.activation_checkpointing import apply_activation_checkpointing
    from trainlib.benchmarks.ac_memory import retained_activation_bytes
    from trainlib.models.gpt import GPT as GPTModel, GPTConfig

    cfg = GPTConfig(vocab_size=256, seq_len=32, n_layer=2, n_head=4, d_model=64)
    model = GPTModel(cfg)
    if ac != "none":
        apply_activation_checkpointing(model, ac)
    x = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    retained, _ = retained_activation_bytes(model, (x, x))
    predicted = peak_memory(ModelSpec.gpt(cfg), Layout(1, 1, 1, ac=ac), global_batch=4).activations
    assert predicted == pytest.approx(retained, rel=0.03)


# -- time ----------------------------------------------------------------------------------------------
def test_step_time_hand_computed():
    mlp = ModelSpec.mlp(1000, 2)
    t = step_time(mlp, Layout(1, 1, 1), ClusterSpec(1, 1, "cpu", 10, 8), profile(), global_batch=10)
    fwd = 2 * 2 * 1000 ** 2 * 10 / 1e9 + 2 * (2 * 1000) * 10 * 4 / 1e9   # matmuls + ReLU/bias bytes
    assert t.compute == pytest.approx(3 * fwd)
    assert t.optimizer == pytest.approx(2 * 1_001_000 * 84 / 1e9)
    assert t.dp_sync == t.tp == t.bubble == 0


def test_few_rows_on_a_wide_layer_stream_the_weight():
    """A matmul call takes its FLOPs' time or its weight's streaming time, whichever is longer: 2 rows
    through a 1000 x 1000 layer (4 MB) at 1e9 B/s take 4 ms a call against 4 us of FLOPs; 4,000 rows
    per call keep the FLOP time (16 ms > 4 ms)."""
    mlp = ModelSpec.mlp(1000, 2)
    prof = profile(matmul_weight_Bps=1e9)
    elem = 2 * (2 * 1000) * 4 / 1e9                                        # ReLU/bias bytes per row
    few = step_time(mlp, Layout(1, 1, 1), ClusterSpec(1, 1, "cpu", 10, 8), prof, global_batch=2)
    assert few.compute == pytest.approx(3 * (2 * 1000 ** 2 * 4 / 1e9 + 2 * elem))
    many = step_time(mlp, Layout(1, 1, 1), ClusterSpec(1, 1, "cpu", 10, 8), prof, global_batch=4000)
    assert many.compute == pytest.approx(3 * (2 * 2 * 1000 ** 2 * 4000 / 1e9 + 4000 * elem))
    # a pipeline's microbatches each stream the weight again
    piped = step_time(mlp, Layout(2, 1, 1, schedule="1f1b", microbatches=2), ClusterSpec(1, 2, "cpu", 10, 8), prof,
                      global_batch=4)
    assert piped.compute == pytest.approx(3 * (2 * 1000 ** 2 * 4 / 1e9 + 4 * elem / 2))


def test_tensor_parallel_narrows_only_the_row_parallel_matmuls():
    """Under tp=2 the row-parallel linears (attention's output projection d x d, the MLP's down projection
    4d x d) run at the rate of width d/2, the rest (QKV, the MLP's up projection, attention's products) at
    width d: the default GPT's block is 5d^2 of 12d^2 + s d weights-and-attention per token row-parallel."""
    d, s = GPT.d_model, GPT.seq_len
    assert GPT.row_parallel_share(1) == pytest.approx(5 * d * d / (12 * d * d + s * d))
    assert GPT.row_parallel_share(0) == GPT.row_parallel_share(GPT.n_layer + 1) == 0.0
    assert ModelSpec.mlp(64, 2).row_parallel_share(0) == 0.0
    half_width = 100.0
    prof = profile(matmul_half_width=half_width, matmul_weight_Bps=0.0)
    lay = [1]
    tokens = 8 * s
    wide, narrow = 1e9 * d / (d + half_width), 1e9 * (d / 2) / (d / 2 + half_width)
    share = GPT.row_parallel_share(1)
    got = matmul_seconds(GPT, lay, 2, tokens, wide, prof, 4, narrow)
    assert got == pytest.approx(GPT.matmul_flops_per_token(1) / 2 * tokens * ((1 - share) / wide + share / narrow))
    # at tp=1 nothing is split: the model's width alone
    assert matmul_seconds(GPT, lay, 1, tokens, wide, prof, 4, narrow) == pytest.approx(
        GPT.matmul_flops_per_token(1) * tokens / wide)
    # and step_time takes those two rates from the profile's width fit: against no width penalty, its
    # compute grows by 3 x (forward + 2 backward) the difference of the two rates' matmul times
    layers = list(range(GPT.pipeline_layers()))
    grown = (step_time(GPT, Layout(1, 1, 2), ONE_NODE, prof, 8).compute
             - step_time(GPT, Layout(1, 1, 2), ONE_NODE, profile(matmul_weight_Bps=0.0), 8).compute)
    assert grown == pytest.approx(3 * (matmul_seconds(GPT, layers, 2, tokens, wide, prof, 4, narrow)
                                       - matmul_seconds(GPT, layers, 2, tokens, 1e9, prof, 4, 1e9)))


def test_dp_sync_ring_and_across_nodes():
    prof = profile()
    m = 875_264 * 4
    copy = 2 * m / 1e9                                                  # AccumulateGrad into the bucket
    one = dp_sync_time(GPT, Layout(1, 2, 1), ONE_NODE, prof, 875_264, backward_s=0.0)
    assert one == pytest.approx(t_allreduce(m, 2, 4e9, 1e-5) + copy)    # shm link inside the node
    two_nodes = ClusterSpec(2, 1, "cpu", 8.0, 8.0)                      # 1 GB/s NICs at 50% efficiency
    across = dp_sync_time(GPT, Layout(1, 2, 1), two_nodes, prof, 875_264, backward_s=0.0)
    assert across == pytest.approx(2 * (2 - 1) / 2 * m / (1e9 * 0.5) + 2 * 1e-4 + copy)
    zero1 = dp_sync_time(GPT, Layout(1, 2, 1, shard="optimizer"), ONE_NODE, prof, 875_264, 0.0)
    assert zero1 == pytest.approx(2.0 * (one - copy) + copy)            # rs_ag_over_ar (an old profile's)
    # the node's shm transport has its own ratio: rs + ag in place cost what its all-reduce does
    shm1 = dp_sync_time(GPT, Layout(1, 2, 1, shard="optimizer"), ONE_NODE, profile(sync_rs_ag_over_ar=1.0),
                        875_264, 0.0)
    assert shm1 == pytest.approx(one)
    # ZeRO-3: the reduce-scatter, the forward's all-gather, and backward's of all but the held unit
    n = 875_264
    zero3 = dp_sync_time(GPT, Layout(1, 2, 1, shard="parameters"), ONE_NODE, prof, n, 0.0, held_params=n / 4)
    assert zero3 == pytest.approx(2.0 * (t_allreduce(m, 2, 4e9, 1e-5) + t_allreduce(m * 7 / 4, 2, 4e9, 1e-5)) / 2
                                  + copy)
    # compressed: gradients reduce-scattered in bf16 over gloo's 16-bit path, fp32 parameters gathered
    # over gloo (a compressed sync takes torch's transport), plus the casts both ways
    comp = profile(compress_alpha_s=2e-4, compress_Bps=5e8, sync_rs_ag_over_ar=1.0)   # gloo's 2.0 applies
    z1c = dp_sync_time(GPT, Layout(1, 2, 1, shard="optimizer", compress="bf16"), ONE_NODE, comp, n, 0.0)
    assert z1c == pytest.approx(2.0 * (t_allreduce(m / 2, 2, 5e8, 2e-4) + t_allreduce(m, 2, 1e9, 1e-4)) / 2
                                + 2 * (m + m / 2) / 1e9)
    hidden = dp_sync_time(GPT, Layout(1, 2, 1), ONE_NODE, profile(overlap=1.0), 875_264, backward_s=1.0)
    assert hidden == 0.0


def test_node_sync_past_the_caches_runs_at_the_dram_rate():
    """The shm all-reduce's bytes past SYNC_CACHE_BYTES move at sync_dram_Bps (n = 2: each byte once more
    than its in-cache time); gloo's links and a gradient that fits the caches are unchanged."""
    from trainlib.planner.timing import SYNC_CACHE_BYTES, allreduce_time

    prof = profile(sync_dram_Bps=1e9)
    big = 48 * 2**20
    assert allreduce_time(big, 2, 1, ONE_NODE, prof, "sync") == pytest.approx(
        t_allreduce(big, 2, 4e9, 1e-5) + (big - SYNC_CACHE_BYTES) * (1 / 1e9 - 1 / 4e9))
    assert allreduce_time(4 * 2**20, 2, 1, ONE_NODE, prof, "sync") == pytest.approx(t_allreduce(4 * 2**20, 2, 4e9, 1e-5))
    assert allreduce_time(big, 2, 1, ONE_NODE, prof, "intra") == pytest.approx(t_allreduce(big, 2, 1e9, 1e-4))
    # 4 ranks: the ring's 2(n-1)/n share of the bytes
    four = ClusterSpec(1, 4, "cpu", 10.0, 8.0)
    assert allreduce_time(big, 4, 1, four, prof, "sync") == pytest.approx(
        t_allreduce(big, 4, 4e9, 1e-5) + 1.5 * (big - SYNC_CACHE_BYTES) * (1 / 1e9 - 1 / 4e9))


def test_token_bucket_nic_lets_its_refilled_burst_through():
    """The emulated cluster's NICs are tbf token buckets: after gap_s of compute, up to the burst of
    bytes leaves at once; a real NIC (burst 0) sends everything at line rate."""
    from trainlib.netcluster import tbf_burst_bytes
    from trainlib.planner.timing import allreduce_time, nic_time

    prof = profile()                                                   # inter_efficiency 0.5
    line = ClusterSpec(2, 1, "cpu", 8.0, 8.0)                          # 1 GB/s -> 0.5 GB/s effective
    bucket = ClusterSpec(2, 1, "cpu", 8.0, 8.0, nic_burst_bytes=300_000)
    assert nic_time(1e6, line, prof, gap_s=1.0) == pytest.approx(1e6 / 5e8)
    assert nic_time(1e6, bucket, prof, gap_s=1.0) == pytest.approx(7e5 / 5e8)           # the whole burst
    assert nic_time(1e6, bucket, prof, gap_s=2e-4) == pytest.approx((1e6 - 1e5) / 5e8)  # refilled 2e-4 x 5e8
    assert nic_time(2e5, bucket, prof, gap_s=1.0) == 0.0
    # a TP-sized all-reduce across the two nodes: the ring's bytes on the NIC, less the refill, + 2 alphas
    assert allreduce_time(524_288, 2, 1, bucket, prof, gap_s=1e-3) == pytest.approx(
        (524_288 - 300_000) / 5e8 + 2 * 1e-4)
    assert tbf_burst_bytes("1gbit") == 500_000 and tbf_burst_bytes("100mbit") == 64 * 1024
    with pytest.raises(PlanError, match="nic_burst_bytes"):
        ClusterSpec(2, 1, "cpu", 8.0, 8.0, nic_burst_bytes=-1)


def test_zero_across_nodes_moves_an_allreduce_and_hides_prefetched_gathers():
    """Across nodes the NIC sets a sharded sync's pace: a reduce-scatter and an all-gather are half an
    all-reduce each (no local rs_ag_over_ar); ZeRO-3's per-unit gathers hide behind the compute of the unit
    before them, all but the first forward one."""
    prof = profile()
    two = ClusterSpec(2, 1, "cpu", 8.0, 8.0)
    n, m = 875_264, 875_264 * 4
    ar = lambda nbytes: nbytes / 5e8 + 2 * 1e-4                        # one all-reduce across the 2 nodes
    copy = 2 * m / 1e9                                                  # the gradients into their buckets
    z1 = dp_sync_time(GPT, Layout(1, 2, 1, shard="optimizer"), two, prof, n, backward_s=0.0)
    assert z1 == pytest.approx(ar(m) / 2 + ar(m) / 2 + copy)
    units = 6                                                          # embed, 4 blocks, final
    hidden = dp_sync_time(GPT, Layout(1, 2, 1, shard="parameters"), two, prof, n, backward_s=10.0, units=units,
                          held_params=n / units)
    # the gradients, the first gather, and each later gather's latency (alpha: its rendezvous)
    assert hidden == pytest.approx(ar(m) / 2 + ar(m / units) / 2 + (2 * units - 2) * 1e-4 + copy)
    bare = dp_sync_time(GPT, Layout(1, 2, 1, shard="parameters"), two, prof, n, backward_s=0.0, units=units,
                        held_params=n / units)
    assert bare == pytest.approx(ar(m) / 2 + ar(m / units) / 2 + (units - 1) * ar(m / units) / 2
                                 + (units - 1) * ar(m / units) / 2 + copy)


def test_gloo_reduce_scatter_below_its_p2p_size_costs_an_allreduce_across_nodes():
    """trainlib.comm runs a gloo reduce-scatter under GLOO_P2P_MIN_BYTES as an all-reduce keeping its chunk:
    across nodes on CPU such a bucket's reduce-scatter moves a whole all-reduce's bytes, a larger one half;
    a compressed sharded sync pays its fixed cost per collective there too."""
    from trainlib.comm import GLOO_P2P_MIN_BYTES
    from trainlib.planner.memory import bucket_bytes
    from trainlib.planner.timing import gloo_rs_halves, sharded_collectives

    small, large = GLOO_P2P_MIN_BYTES / 4, GLOO_P2P_MIN_BYTES * 2
    assert gloo_rs_halves([small, large]) == pytest.approx((2 * small + large) / (small + large))
    assert gloo_rs_halves([]) == 1.0
    prof = profile(compress_collective_s=1e-3)
    two = ClusterSpec(2, 1, "cpu", 8.0, 8.0)
    n, m = 875_264, 875_264 * 4
    ar = lambda nbytes: nbytes / 5e8 + 2 * 1e-4                        # one all-reduce across the 2 nodes
    lay = Layout(1, 2, 1, shard="optimizer")
    buckets = bucket_bytes(GPT, lay, list(range(GPT.pipeline_layers())))
    assert sum(buckets) == pytest.approx(m, rel=1e-6) and max(buckets) < GLOO_P2P_MIN_BYTES
    z1 = dp_sync_time(GPT, lay, two, prof, n, backward_s=0.0, buckets=buckets)
    assert z1 == pytest.approx(ar(2 * m) / 2 + ar(m) / 2 + 2 * m / 1e9)   # the gradients' all-reduce + a gather
    # bf16 on the wire: half the gradient bytes (all still under the size), its cast, a fixed cost each
    z1c = dp_sync_time(GPT, Layout(1, 2, 1, shard="optimizer", compress="bf16"), two, prof, n, backward_s=0.0,
                       buckets=buckets)
    assert sharded_collectives(lay, m, 0) == 4
    assert z1c == pytest.approx(ar(m) / 2 + ar(m) / 2 + 4 * 1e-3 + 2 * (m + m / 2) / 1e9)
    # on an accelerator (NCCL: a native reduce-scatter) no bucket list: half an all-reduce
    gpu = ClusterSpec(2, 1, "h100", 8.0, 80.0)
    assert dp_sync_time(GPT, lay, gpu, prof, n, backward_s=0.0) == pytest.approx(ar(m) / 2 + ar(m) / 2 + 2 * m / 1e9)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb-h1"])
def test_bubble_is_the_schedules_own(schedule):
    lay = Layout(2, 1, 1, schedule=schedule, microbatches=4)
    t = step_time(GPT, lay, ONE_NODE, profile(), global_batch=8)
    assert t.bubble == pytest.approx((t.compute + t.tp) * theory_bubble(schedule, 2, 4), rel=1e-9)


# -- enumeration ---------------------------------------------------------------------------------------
def _reference(model_cfg: dict, world: int, batch: int, precision: str) -> set[tuple]:
    """Brute force: every combination trainlib's validator accepts without a warning, with the choices a
    layout ignores (sync with dp = 1, schedule with pp = 1) folded into one canonical entry."""
    out = set()
    acs = ("none", "selective", "full")
    for pp, dp, tp in itertools.product(range(1, world + 1), repeat=3):
        if pp * dp * tp != world:
            continue
        pipes = [("1f1b", 0)] if pp == 1 else [(s, k * pp) for s in SCHEDULES for k in MICROBATCH_FACTORS]
        for (schedule, m), shard, kind, compress, ac in itertools.product(
                pipes, SHARDS, ("allreduce", "ps"), ("none", "bf16"), acs):
            flags = [f"--mesh.pp={pp}", f"--mesh.dp={dp}", f"--mesh.tp={tp}", f"--mesh.schedule={schedule}",
                     f"--mesh.microbatches={m}", f"--dp.shard={shard}", f"--sync.kind={kind}",
                     f"--sync.compress={compress}", f"--train.activation_checkpointing={ac}",
                     f"--train.precision={precision}", f"--train.batch_size={batch}",
                     *(f"--model.{k}={v}" for k, v in model_cfg.items())]
            try:
                cfg = load_config(None, flags)
                layout = mesh_layout(cfg, world)
                check_model_over_mesh(cfg, layout)
                check_batch(cfg, layout)
                check_pipeline(cfg, layout)
                if not_applicable(cfg, layout):
                    continue          # a warning: a value this layout ignores
            except ConfigError:
                continue
            if dp == 1:
                shard, kind, compress = "none", "allreduce", "none"
            out.add((pp, dp, tp, shard, schedule if pp > 1 else "-", m if pp > 1 else 0, ac, kind, compress))
    return out


@pytest.mark.parametrize("model_cfg,world,batch,precision", [
    ({}, 4, 16, "fp32"),                                                  # the default GPT on 4 ranks
    ({"n_layer": 2, "n_head": 6, "d_model": 192}, 4, 8, "bf16"),          # 6 heads: no tp 4; 4 layers: pp 4 only
])
def test_enumeration_equals_brute_force_over_the_validator(model_cfg, world, batch, precision):
    spec = ModelSpec.gpt(ModelConfig(**model_cfg))
    got = {(l.pp, l.dp, l.tp, l.shard, l.schedule if l.pp > 1 else "-", l.microbatches if l.pp > 1 else 0, l.ac,
            l.sync, l.compress)
           for l in enumerate_layouts(spec, ClusterSpec(1, world, "cpu", 10, 8), batch, precision)}
    assert got == _reference(model_cfg, world, batch, precision)
    assert len(got) == len(enumerate_layouts(spec, ClusterSpec(1, world, "cpu", 10, 8), batch, precision))


# -- profiles ------------------------------------------------------------------------------------------
def test_profile_round_trips(tmp_path):
    p = profile(matmul_fp32_flops=1.5e10)
    p.measured = {"loadavg_before": [1.0, 2.0, 3.0]}
    p.save(tmp_path / "p.json")
    q = load(str(tmp_path / "p.json"))
    assert (q.values, q.sources, q.validated, q.measured, q.name) == (p.values, p.sources, p.validated, p.measured,
                                                                       p.name)


def test_shipped_profiles_name_a_source_for_every_value():
    assert {"h100", "h200", "trn1", "trn2", "cpu"} <= set(shipped_names())
    for name in ("h100", "h200", "trn1", "trn2"):
        p = load(name)
        assert not p.validated and set(p.values) == set(KEYS)
        assert all(p.sources[k].strip() for k in KEYS), name


def test_profile_missing_key_is_an_error(tmp_path):
    data = profile().to_json()
    del data["values"]["ps_Bps"]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match="lacks ps_Bps"):
        load(str(tmp_path / "bad.json"))


# -- the command ---------------------------------------------------------------------------------------
def test_json_ranks_and_the_winner_runs_as_trainlib_train(capsys, tmp_path):
    from trainlib.trainer import config_from_argv
    from trainlib.validate import check_run

    assert main(["--json", "--global-batch", "8"]) == 0
    out = json.loads(capsys.readouterr().out)
    plans = out["plans"]
    fit = [p["step_s"] for p in plans if p["fits"]]
    assert fit == sorted(fit) and all(p["peak_bytes"] > 0 for p in plans)
    assert all(p["reason"] for p in plans[1:])
    for nodes, per_node in ((1, 2), (2, 4)):
        assert main(["--emit", "train", "--nodes", str(nodes), "--devices-per-node", str(per_node),
                     "--global-batch", "16", "--model.n_layer", "6"]) == 0
        argv = capsys.readouterr().out.split()
        assert argv[:2] == ["trainlib", "train"]
        rest = [a for a in argv[2:] if not a.startswith("--nproc-per-node")]
        cfg = config_from_argv(rest)
        assert cfg.model.n_layer == 6 or "--model.n_layer" not in " ".join(rest)
        assert check_run(cfg, nodes * per_node, nodes, env={}) == []     # accepted, and nothing ignored


def test_does_not_fit_is_listed(capsys):
    assert main(["--device-memory-gb", "0.005", "--global-batch", "8"]) == 0
    out = capsys.readouterr().out
    assert "0 fit" in out and "does not fit" in out
    assert main(["--device-memory-gb", "0.005", "--global-batch", "8", "--emit", "train"]) == 1
    assert "no layout fits" in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["--nodes", "0"], "--nodes=0 must be >= 1"),
    (["--device", "tpu9"], "--device 'tpu9' is not one of"),
    (["--global-batch", "0"], "--global-batch=0 must be >= 1"),
    (["--params", "7e9", "--layers", "32"], "add --hidden --vocab --seq"),
    (["--model", "/nonexistent/config.json"], "no such file"),
    (["--nic-gbps", "0"], "--nic-gbps=0.0 must be > 0"),
    (["--model.n_head", "3"], "model.d_model=128 is not divisible by model.n_head=3"),
    (["--bogus", "1"], "unknown argument '--bogus'"),
    (["--emit", "helmchart"], "--emit helmchart"),
    (["--profile", "/nonexistent.json"], "neither a shipped profile"),
    (["--probe-model", "--device", "h200"], "--probe-model times the model on this machine's CPU"),
    (["--probe-model", "--params", "7e9", "--layers", "32", "--hidden", "4096", "--seq", "4096", "--vocab", "32000"],
     "--probe-model builds the default GPT"),
])
def test_bad_flags_name_the_value_and_the_fix(argv, needle, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("trainlib plan: error: ") and needle in err, err


def test_projection_7b_on_h200_picks_a_fitting_sharded_or_split_layout(capsys):
    assert main(["--params", "6.74e9", "--layers", "32", "--hidden", "4096", "--seq", "4096", "--vocab", "32000",
                 "--nodes", "16", "--devices-per-node", "8", "--device", "h200", "--global-batch", "512", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    best = out["plans"][0]
    assert best["fits"] and best["peak_bytes"] <= 141 * 2**30 and not out["validated"]
    assert math.isfinite(best["step_s"]) and best["step_s"] > 0


# -- feature costs (calibrated on the probe GPT) ---------------------------------------------------------
def test_feature_costs_enter_the_step_time_where_the_feature_pays():
    base = profile()
    lay3 = Layout(1, 2, 1, shard="parameters")
    units = GPT.pipeline_layers()                     # one ZeRO-3 unit per pipeline layer, gathered twice
    assert (step_time(GPT, lay3, ONE_NODE, profile(zero3_unit_s=1e-3), 8).dp_sync
            - step_time(GPT, lay3, ONE_NODE, base, 8).dp_sync) == pytest.approx(2 * units * 1e-3)
    sel = Layout(1, 1, 1, ac="selective")
    ops = GPT.n_layer * 14                            # timing.OPS_PER_BLOCK per block
    assert (step_time(GPT, sel, ONE_NODE, profile(selective_op_s=1e-4), 8).compute
            - step_time(GPT, sel, ONE_NODE, base, 8).compute) == pytest.approx(ops * 1e-4)
    # ZB-H1 recomputes for I and again for W: the second pays the replay's half of the per-op cost; rank 0 of
    # pp=2 holds 2 of the 4 blocks, 4 microbatches
    zb = Layout(2, 1, 1, schedule="zb-h1", microbatches=4, ac="selective")
    assert (step_time(GPT, zb, ONE_NODE, profile(selective_op_s=1e-4), 8).compute
            - step_time(GPT, zb, ONE_NODE, base, 8).compute) == pytest.approx(1.5 * 2 * 14 * 4 * 1e-4)
    # a compressed ZeRO sync in a node: per collective (ZeRO-3: a reduce-scatter and two gathers per unit,
    # one gather less for the unit kept from the forward; ZeRO-1: a reduce-scatter and an all-gather per
    # bucket, here 2 buckets: 3.5 MB of fp32 gradients = the 1 MB first one + one of up to 25 MB)
    for lay, n_coll in ((Layout(1, 2, 1, shard="parameters", compress="bf16"), 3 * units - 1),
                        (Layout(1, 2, 1, shard="optimizer", compress="bf16"), 4)):
        assert (step_time(GPT, lay, ONE_NODE, profile(compress_collective_s=1e-3), 8).dp_sync
                - step_time(GPT, lay, ONE_NODE, base, 8).dp_sync) == pytest.approx(n_coll * 1e-3)
    assert (step_time(GPT, lay3, ONE_NODE, profile(compress_collective_s=1e-3), 8).dp_sync
            == step_time(GPT, lay3, ONE_NODE, base, 8).dp_sync)       # uncompressed: the node's transport
    for shard, extra in (("none", 0.0), ("optimizer", 2e-3), ("gradients", 2e-3), ("parameters", 2e-3)):
        lay = Layout(1, 2, 1, shard=shard)
        assert (step_time(GPT, lay, ONE_NODE, profile(zero_step_s=2e-3), 8).dp_sync
                - step_time(GPT, lay, ONE_NODE, base, 8).dp_sync) == pytest.approx(extra)
    tp = Layout(1, 1, 2)
    assert (step_time(GPT, tp, ONE_NODE, profile(tp_collective_s=1e-3), 8).tp
            - step_time(GPT, tp, ONE_NODE, base, 8).tp) == pytest.approx((4 * GPT.n_layer + 3) * 1e-3)
    pp = Layout(2, 1, 1, schedule="1f1b", microbatches=4)
    assert (step_time(GPT, pp, ONE_NODE, profile(solo_speedup=2.0), 8).bubble
            == pytest.approx(step_time(GPT, pp, ONE_NODE, base, 8).bubble / 2))
    full = Layout(1, 1, 1, ac="full")
    none = step_time(GPT, Layout(1, 1, 1), ONE_NODE, base, 8).compute
    extra = step_time(GPT, full, ONE_NODE, base, 8).compute - none
    assert (step_time(GPT, full, ONE_NODE, profile(recompute_share=0.5), 8).compute - none
            == pytest.approx(extra - 0.5 * (extra - GPT.n_layer * 14 * 0.5 * base["op_s"])))
    # full checkpointing's cost per call: each block of the rank, each microbatch, each recomputation
    # (ZB-H1's split backward recomputes for I and again for W); rank 0 of pp=2 holds 2 of the 4 blocks
    for lay, calls in ((full, GPT.n_layer), (Layout(2, 1, 1, schedule="1f1b", microbatches=4, ac="full"), 2 * 4),
                       (Layout(2, 1, 1, schedule="zb-h1", microbatches=4, ac="full"), 2 * 4 * 2)):
        assert (step_time(GPT, lay, ONE_NODE, profile(checkpoint_call_s=1e-3), 8).compute
                - step_time(GPT, lay, ONE_NODE, base, 8).compute) == pytest.approx(calls * 1e-3)
    # a data-parallel all-reduce sync inside a node pays a fixed cost per step; not across nodes (the link's
    # sounded rate holds it), not the parameter server (ps_sync_s), not without data parallelism
    for lay, cluster, extra in ((Layout(1, 2, 1), ONE_NODE, 1e-3), (Layout(1, 2, 1, shard="optimizer"), ONE_NODE, 1e-3),
                                (Layout(1, 2, 1), ClusterSpec(2, 1, "cpu", 8.0, 8.0), 0.0),
                                (Layout(1, 2, 1, sync="ps"), ONE_NODE, 0.0),
                                (Layout(2, 1, 1, schedule="1f1b", microbatches=4), ONE_NODE, 0.0)):
        assert (step_time(GPT, lay, cluster, profile(dp_step_s=1e-3), 8).dp_sync
                - step_time(GPT, lay, cluster, base, 8).dp_sync) == pytest.approx(extra)
    # each microbatch after the first pays per block of the rank (gradient accumulation, its own graph):
    # none for a whole batch, 3 x 2 for pp=2's rank of 2 blocks at m=4, whatever the checkpointing
    for lay, extra in ((Layout(1, 1, 1), 0), (Layout(2, 1, 1, schedule="1f1b", microbatches=4), 3 * 2),
                       (Layout(2, 1, 1, schedule="zb-h1", microbatches=4, ac="full"), 3 * 2)):
        assert (step_time(GPT, lay, ONE_NODE, profile(microbatch_block_s=1e-3), 8).compute
                - step_time(GPT, lay, ONE_NODE, base, 8).compute) == pytest.approx(extra * 1e-3)


def test_feature_costs_fit_recovers_the_costs_that_made_the_measurements():
    """Probe 'measurements' made by the model itself with known feature costs: the fit returns those costs."""
    from trainlib.config import ModelConfig as MC
    from trainlib.planner.calibrate import FEATURE_LAYOUTS, PROBE, feature_costs

    from trainlib.planner.calibrate import CKPT_MICRO, _accumulated

    from trainlib.planner.calibrate import MLP_FEATURES, MLP_PROBE

    # compress_overlap: the share of the backward (here ~0.23 s of slow matmuls) behind which the MLP probe's
    # ~14 ms of reduce-scatters run; small enough that some of them stay exposed, so the fit can see it
    truth = dict(recompute_share=1.0, checkpoint_call_s=8e-4, selective_op_s=2e-4, solo_speedup=1.3, zero3_unit_s=5e-4,
                 tp_collective_s=1e-3, compress_collective_s=2e-3, zero_step_s=3e-3, compress_overlap=0.03,
                 microbatch_block_s=6e-4, dp_step_s=4e-3)
    mlp = ModelSpec.mlp(MLP_PROBE["width"], MLP_PROBE["depth"])
    values = profile(op_s=1e-5).values
    spec = ModelSpec.gpt(MC(**{k: v for k, v in PROBE.items() if k != "batch"}))
    alone = ClusterSpec(1, 1, "cpu", 10.0, 8.0)

    def t(layout, cluster) -> float:
        return step_time(spec, layout, cluster, profile(op_s=1e-5, **truth), PROBE["batch"]).total

    probe = t(Layout(1, 1, 1), alone)
    measured = {"probe_s": probe, "probe_full_s": t(Layout(1, 1, 1, ac="full"), alone),
                "probe_selective_s": t(Layout(1, 1, 1, ac="selective"), alone), "probe_solo_s": probe / 1.3,
                "probe_plain_micro_s": _accumulated(profile(op_s=1e-5, **truth).values, "none", CKPT_MICRO),
                "probe_full_micro_s": _accumulated(profile(op_s=1e-5, **truth).values, "full", CKPT_MICRO),
                **{k: t(lay, ONE_NODE) for k, lay in FEATURE_LAYOUTS.items()},
                **{k: step_time(mlp, lay, ONE_NODE, profile(op_s=1e-5, **truth), MLP_PROBE["batch"]).total
                   for k, lay in MLP_FEATURES.items()}}
    got = feature_costs(values, measured)
    assert got == pytest.approx(truth, rel=1e-6)
    # the plain probe timed once at a faster moment than the checkpointed ones: the plain probe timed in
    # turn with them is the base of their differences, so recomputation does not absorb the drift
    # (and tp=2's base is the plain probe timed in the feature rounds: a per-collective cost unmoved)
    skewed = feature_costs(values, {**measured, "probe_s": probe * 0.8, "probe_plain_s": probe, "tp2_base_s": probe})
    assert (skewed["recompute_share"], skewed["selective_op_s"], skewed["checkpoint_call_s"],
            skewed["tp_collective_s"], skewed["microbatch_block_s"], skewed["dp_step_s"]) == pytest.approx(
        (truth["recompute_share"], truth["selective_op_s"], truth["checkpoint_call_s"], truth["tp_collective_s"],
         truth["microbatch_block_s"], truth["dp_step_s"]), rel=1e-6)
    # without that base (an older profile), the drift goes into it
    assert feature_costs(values, {**measured, "probe_s": probe * 0.8})["tp_collective_s"] > truth["tp_collective_s"] * 1.5
    # an older profile's measurements (no microbatched pair): the cost per call from the whole batch alone
    old = {k: v for k, v in measured.items() if "micro" not in k}
    assert feature_costs(values, old)["checkpoint_call_s"] == pytest.approx(truth["checkpoint_call_s"], rel=1e-6)
    assert feature_costs(values, old)["microbatch_block_s"] == 0.0
    # the share is not a second unknown: 3% noise on the microbatched measurement moves only the
    # cost per call, by less than that noise spread over the CKPT_MICRO x n_layer calls it has a step
    noisy = feature_costs(values, {**measured, "probe_full_micro_s": measured["probe_full_micro_s"] * 1.03})
    assert noisy["recompute_share"] == 1.0
    moved = noisy["checkpoint_call_s"] - truth["checkpoint_call_s"]
    assert 0 < moved < measured["probe_full_micro_s"] * 0.03 / (CKPT_MICRO * PROBE["n_layer"])


def test_width_fit_recovers_the_efficiency_and_width_that_timed_both_probes():
    from trainlib.planner.calibrate import PROBE, WIDE_PROBE, _probe_time, width_fit

    values = profile(op_s=1e-5, matmul_half_rows=4.0).values
    truth = {**values, "compute_efficiency": 0.9, "matmul_half_width": 80.0}
    narrow, wide = _probe_time(truth, PROBE), _probe_time(truth, WIDE_PROBE)
    assert width_fit(values, narrow, wide) == pytest.approx((0.9, 80.0), rel=1e-4)
    # a wide probe no faster than no width effect says: w = 0, the narrow probe's efficiency
    eff, w = width_fit(values, narrow, 10 * wide)
    assert w == 0.0 and _probe_time({**values, "compute_efficiency": eff, "matmul_half_width": 0.0}, PROBE) \
        == pytest.approx(narrow, rel=1e-6)


def test_pipeline_overhead_counts_transfers_and_split_backward_calls():
    """Per rank: actions x pp_action_s + transfers x p2p + ZB-H1's W calls x grad_call_s (hand-counted)."""
    from trainlib.planner.memory import schedule_facts

    # 1F1B on 2 ranks: each action has one transfer; interleaved adds one at every chunk boundary; W has none
    assert schedule_facts("1f1b", 2, 8)[2] == ((16, 16), (16, 16))
    assert schedule_facts("interleaved", 2, 8)[2] == ((32, 48), (32, 48))
    assert schedule_facts("zb-h1", 2, 8)[2] == ((24, 16), (24, 16))
    assert schedule_facts("1f1b", 4, 8)[2][1] == (16, 32)          # a middle rank receives and sends both ways
    p2p = 1e-4 + 128 * 128 * 4 / 1e9          # intra alpha + a microbatch's activations (1 x 128 tokens x d 128)
    prof = profile(pp_action_s=0.0)
    for sched, msgs in (("1f1b", 16), ("interleaved", 48), ("zb-h1", 16)):
        lay = Layout(2, 1, 1, schedule=sched, microbatches=8)
        assert step_time(GPT, lay, ONE_NODE, prof, 8).pp_actions == pytest.approx(msgs * p2p, rel=1e-6), sched
    # ZB-H1's W: one autograd call per parameter-owning module per microbatch, the worse of the two ranks
    # (GPT's 6 layers split [embed, 2 blocks] + [2 blocks, final]: 1 + 6 + 6 = 13 and 6 + 6 + 2 = 14)
    zb = Layout(2, 1, 1, schedule="zb-h1", microbatches=8)
    extra = (step_time(GPT, zb, ONE_NODE, profile(pp_action_s=0.0, grad_call_s=1e-3), 8).pp_actions
             - step_time(GPT, zb, ONE_NODE, prof, 8).pp_actions)
    assert extra == pytest.approx(8 * 14 * 1e-3)
    ckpt = Layout(2, 1, 1, schedule="zb-h1", microbatches=8, ac="full")   # W is one call per stage then
    assert step_time(GPT, ckpt, ONE_NODE, profile(pp_action_s=0.0, grad_call_s=1e-3), 8).pp_actions \
        == pytest.approx(step_time(GPT, ckpt, ONE_NODE, prof, 8).pp_actions)


def test_parameter_server_fit_separates_sync_message_and_byte_costs():
    """Syncs timed by t = a + msgs c + 2M/B with known a, c, B (the calibration's three probes): the fit
    returns them; a sync whose cost is all per message is not read as per-sync or per-byte cost."""
    from trainlib.planner.calibrate import PS_PROBES, fit_parameter_server

    def points(a, c, bps):
        return [(mib * 2**20, int(mib / part), a + mib / part * c + 2 * mib * 2**20 / bps) for mib, part in PS_PROBES]

    assert fit_parameter_server(points(2e-3, 5e-4, 8e8)) == pytest.approx((2e-3, 5e-4, 8e8), rel=1e-6)
    a, c, _ = fit_parameter_server(points(0.0, 3e-3, 1e12))
    assert a == pytest.approx(0.0, abs=1e-9) and c == pytest.approx(3e-3, rel=1e-6)
    with pytest.raises(ValueError, match="same bytes"):
        fit_parameter_server([(1, 1, 1.0), (4, 4, 2.0), (8, 16, 3.0)])
    # the time model adds the per-sync cost once per step, the message cost per 4 MB partition
    layout = Layout(1, 2, 1, sync="ps")
    base = dp_sync_time(GPT, layout, ONE_NODE, profile(), 4_000_000, backward_s=0.0)
    assert dp_sync_time(GPT, layout, ONE_NODE, profile(ps_sync_s=0.01), 4_000_000, backward_s=0.0) \
        == pytest.approx(base + 0.01)


def test_a_profile_from_before_the_feature_costs_loads_with_neutral_values(tmp_path):
    data = profile().to_json()
    for k in ("recompute_share", "selective_op_s", "solo_speedup", "zero3_unit_s", "tp_collective_s"):
        del data["values"][k]
    (tmp_path / "old.json").write_text(json.dumps(data))
    p = load(str(tmp_path / "old.json"))
    assert (p["recompute_share"], p["selective_op_s"], p["solo_speedup"], p["zero3_unit_s"], p["tp_collective_s"]) \
        == (1.0, 0.0, 1.0, 0.0, 0.0)
    assert "not measured" in p.sources["solo_speedup"]


def test_bench_plan_reports_its_own_measurement_noise():
    # the two timing passes of a layout (all_s: pass 1's steps, then pass 2's): |1.0 - 1.5| / 1.0, |2 - 2| / 2
    from trainlib.benchmarks.bench_plan import pass_disagreement

    rows = [{"all_s": [1.0, 1.0, 1.0, 1.5, 1.5, 1.5]}, {"all_s": [2.0, 2.0, 2.0, 2.0]}, {"all_s": []}]
    got = pass_disagreement(rows)
    assert got["pass_disagreement_median"] == pytest.approx(0.25) and got["pass_disagreement_p90"] == pytest.approx(0.5)
    assert pass_disagreement([{"all_s": []}]) == {"pass_disagreement_median": None, "pass_disagreement_p90": None}


def test_bench_plan_retimes_the_layouts_whose_passes_disagree():
    from trainlib.benchmarks.bench_plan import RETIME_OVER, pass_disagreement, unsettled

    slow = 1 + 2 * RETIME_OVER
    times = {0: [1.0, 1.0, 1.0, 1.0], 1: [1.0, 1.1, slow, slow], 2: [slow, slow, 1.0, 1.0], 3: [1.0, 1.0, 1.05, 1.1]}
    assert unsettled(times, 2) == [1, 2]
    # a third pass appended to all_s: the noise figure still compares the first two passes
    row = {"all_s": times[1] + [1.0, 1.0], "pass_steps": 2}
    assert pass_disagreement([row])["pass_disagreement_median"] == pytest.approx((slow - 1.05) / 1.05, rel=1e-3)


def test_bench_plan_times_each_layout_twice_half_a_pass_apart():
    # a slow spell of the shared host lasting a few layouts must not land on both passes of one layout:
    # every layout in each pass once, its two passes at least n / 2 positions apart, after another neighbour
    from trainlib.benchmarks.bench_plan import time_orders

    for n in (1, 2, 7, 66):
        order = time_orders(n)
        first, second = order[:n], order[n:]
        assert sorted(first) == sorted(second) == list(range(n))
        gap = [n + second.index(k) - first.index(k) for k in range(n)]
        assert min(gap) >= n // 2
        if n > 2:
            assert all(second[second.index(k) - 1] != first[first.index(k) - 1] for k in range(n) if first.index(k))


def test_bench_plan_decides_the_first_choice_head_to_head():
    """When the passes' best is another layout than the planner's first choice, the duel's medians (the two
    timed in turn) decide whether the first choice is within 5%; the passes' ratio is kept beside."""
    from trainlib.benchmarks.bench_plan import summarize

    def row(layout, rank, measured, **extra):
        return {"place": "local 1x2", "model": "wide-mlp", "planner_rank": rank, "layout": layout,
                "predicted_s": 1.0 + rank / 10, "measured_s": measured, "all_s": [], "time_error": 0.0,
                "memory_error": 0.0, **extra}

    rows = [row("zero1", 1, 1.10), row("zero2", 2, 1.00), row("ar", 3, 1.30)]
    g = summarize(rows)["groups"]["local 1x2 / wide-mlp"]
    assert g["first_over_best"] == pytest.approx(1.10) and "first_over_best_passes" not in g
    rows[0]["duel_s"], rows[1]["duel_s"] = 1.02, 1.00
    s = summarize(rows)
    g = s["groups"]["local 1x2 / wide-mlp"]
    assert g["first_over_best"] == pytest.approx(1.02) and g["first_over_best_passes"] == pytest.approx(1.10)
    assert s["top1_ok"]["local 1x2 / wide-mlp"]
    rows[0]["duel_s"] = 1.08                                    # the duel confirms the gap: a miss
    assert not summarize(rows)["top1_ok"]["local 1x2 / wide-mlp"]


def test_bench_plan_memory_only_scores_every_layouts_peak():
    """--memory-only: each ranked layout's measured peak against the model's (its largest pp rank's; every
    pp rank's kept beside), summarized without any timing."""
    from trainlib.benchmarks import bench_plan as bp
    from trainlib.planner.profile import load

    prof, cluster = load("cpu"), bp.local_cluster()
    plans = bp.rank_layouts("gpt-default", cluster, prof)
    measured = [{"layout": p.layout.label(), "measured_bytes": p.peak_bytes * (1.25 if i == 0 else 1.0)}
                for i, p in enumerate(plans)]
    rows = bp.memory_rows("local 1x2", "gpt-default", plans, measured, prof, cluster)
    assert rows[0]["memory_error"] == pytest.approx(0.2) and all(r["memory_error"] == 0 for r in rows[1:])
    for r, p in zip(rows, plans):
        assert len(r["predicted_rank_bytes"]) == p.layout.pp and max(r["predicted_rank_bytes"]) == p.peak_bytes
    s = bp.summarize_memory(rows)
    assert s["worst_memory_error"] == pytest.approx(0.2) and s["memory_within_10pct"] == round(1 - 1 / len(rows), 3)
    assert s["groups"]["local 1x2 / gpt-default"]["layouts"] == len(rows) == 66
    assert bp.table_headline(s).startswith("66 layouts' peak memory")


def test_bench_plan_duels_only_when_the_passes_best_is_another_layout():
    from trainlib.benchmarks.bench_plan import duel

    calls = []

    def run(phase, items):   # what measure_layouts' "duel" phase returns: a median per layout, then the probe's
        calls.append((phase, [i["layout"] for i in items]))
        return [{"layout": i["layout"], "measured_s": 2.0 + k, "all_s": [2.0 + k]} for k, i in enumerate(items)]

    rows = [{"layout": "a", "flags": ["--x"], "planner_rank": 1, "measured_s": 1.2},
            {"layout": "b", "flags": ["--y"], "planner_rank": 2, "measured_s": 1.0}]
    duel(rows, run)
    assert calls == [("duel", ["a", "b"])] and (rows[0]["duel_s"], rows[1]["duel_s"]) == (2.0, 3.0)
    settled = [{"layout": "a", "flags": [], "planner_rank": 1, "measured_s": 1.0},
               {"layout": "b", "flags": [], "planner_rank": 2, "measured_s": 1.1}]
    duel(settled, run)
    assert len(calls) == 1 and "duel_s" not in settled[0]


def test_bench_plan_warms_up_the_first_layout_of_every_feature():
    from trainlib.benchmarks.bench_plan import warm_ups

    def item(*flags):
        return {"flags": ["--mesh.pp=1", "--mesh.dp=2", "--mesh.tp=1", "--train.batch_size=8", *flags]}
    pp = ["--mesh.pp=2", "--mesh.dp=1", "--mesh.microbatches=4"]
    items = [item(), item("--dp.shard=optimizer"), item("--dp.shard=optimizer"), item("--sync.kind=ps"),
             item("--sync.kind=ps", "--train.activation_checkpointing=full"), item(*pp, "--mesh.schedule=1f1b"),
             item(*pp[:2], "--mesh.microbatches=8", "--mesh.schedule=1f1b"), item(*pp, "--mesh.schedule=gpipe")]
    # the plain first, then the first ZeRO-1, PS, checkpointed, pipelined one, and a new schedule; not
    # the same features again at another microbatch count
    assert warm_ups(items) == [0, 1, 3, 4, 5, 7]
    # the memory phase also warms the first of each pair of features (ZeRO-1 with full checkpointing), once
    items += [item("--dp.shard=optimizer", "--train.activation_checkpointing=full")] * 2
    assert warm_ups(items) == [0, 1, 3, 4, 5, 7]
    assert warm_ups(items, pairs=True) == [0, 1, 3, 4, 5, 7, 8]


def test_bench_plan_memory_passes_visit_every_layout_in_different_orders():
    from trainlib.benchmarks.bench_plan import _pass_order

    orders = [_pass_order(7, p) for p in range(3)]
    assert all(sorted(o) == list(range(7)) for o in orders)
    assert len({tuple(o) for o in orders}) == 3
    assert orders[1] == orders[0][::-1] and orders[2][0] == 3           # forward, reverse, from the middle


def test_bench_plan_measures_the_cross_node_transfer_latency_and_rate():
    # a pipeline action across the emulated link = the local per-action overhead + one transfer; the
    # all-reduces' rate on the wire (2 nodes: an all-reduce of M puts M on each NIC) over the goodput
    from trainlib.benchmarks.bench_plan import with_link
    from trainlib.planner.profile import load

    prof = load("cpu")
    mib = 2**20
    link = {"pp_action_s": prof["pp_action_s"] + 1.5e-3, "sync_point_s": 2e-4,
            "allreduce_s": [[4 * mib, 0.05], [16 * mib, 0.05 + 12 * mib / 100e6]]}
    got = with_link(prof, link, goodput_Bps=125e6)
    assert got["inter_alpha_s"] == pytest.approx(1.5e-3) and "emulated cluster" in got.sources["inter_alpha_s"]
    assert got["inter_efficiency"] == pytest.approx(100e6 / 125e6) and "16 MiB" in got.sources["inter_efficiency"]
    link.update(pp_action_s=prof["pp_action_s"], sync_point_s=4e-4, allreduce_s=[])
    kept = with_link(prof, link, goodput_Bps=125e6)
    assert kept["inter_alpha_s"] == 4e-4 and kept["inter_efficiency"] == prof["inter_efficiency"]
    assert prof["inter_alpha_s"] == load("cpu")["inter_alpha_s"]            # the profile itself untouched


def test_plan_rescore_pools_runs_and_measures_their_agreement():
    # two runs of the same 3 layouts: the agreement of their measurements, and one validation from both
    from trainlib.benchmarks.plan_rescore import pooled, reproducibility

    def row(layout, pred, steps, mem):
        return {"place": "local 1x2", "model": "m", "layout": layout, "predicted_s": pred, "all_s": steps,
                "raw_all_s": [t * 2 for t in steps], "measured_s": statistics.median(steps),
                "raw_measured_s": statistics.median(steps) * 2, "predicted_bytes": 100.0, "measured_bytes": mem}

    one = [row("a", 1.0, [1.0, 1.0], 100.0), row("b", 2.0, [2.0, 2.0], 100.0), row("c", 3.0, [3.0, 3.0], 100.0)]
    two = [row("a", 1.44, [1.2, 1.2], 80.0), row("b", 2.0, [2.0, 2.0], 100.0), row("c", 1.0, [2.4, 2.4], 125.0)]
    agree = reproducibility(one, two)
    assert agree["measured_s"] == {"median": 0.2, "p90": 0.2, "worst": 0.2, "over_worst_target": 0}
    assert agree["measured_bytes"]["worst"] == 0.25 and agree["measured_bytes"]["over_worst_target"] == 0
    assert agree["spearman_per_group"] == {"local 1x2 / m": 1.0}
    rows = {r["layout"]: r for r in pooled([one, two])}
    assert rows["a"]["predicted_s"] == pytest.approx(1.2)                       # geometric mean of 1 and 1.44
    assert rows["a"]["measured_s"] == pytest.approx(1.1)                        # median of all 4 steps
    assert rows["a"]["raw_measured_s"] == pytest.approx(2.2)
    assert rows["a"]["time_error"] == pytest.approx(0.1 / 1.1)
    assert rows["a"]["measured_bytes"] == pytest.approx(90.0) and rows["a"]["memory_error"] == pytest.approx(10 / 90)
    # ranked by the pooled predictions: c (sqrt 3 = 1.73) now before b (2.0)
    assert [rows[k]["planner_rank"] for k in "abc"] == [1, 3, 2]


def test_plan_rescore_gives_back_a_validation_the_same_model_made():
    # rows "measured" as a known multiple of what the planner predicted at a known efficiency: the
    # rescorer must back that efficiency out, give the predictions back, and score the multiples
    import copy

    from trainlib.benchmarks import bench_plan, plan_rescore
    from trainlib.planner.profile import load

    prof = load("cpu")
    run_prof = copy.deepcopy(prof)
    run_prof.values["compute_efficiency"] = 0.37
    rows = []
    for place, cluster in (("local 1x2", plan_rescore._cluster("local 1x2", None)),
                           ("cluster 2x1 1gbit", plan_rescore._cluster("cluster 2x1 1gbit", 1.2e8))):
        for i, p in enumerate(bench_plan.rank_layouts("gpt-default", cluster, run_prof)[:6]):
            rows.append({"place": place, "model": "gpt-default", "planner_rank": i + 1, "layout": p.layout.label(),
                         "predicted_s": p.step_s, "measured_s": p.step_s * (1 + 0.04 * i), "all_s": [],
                         "measured_bytes": p.peak_bytes / (1 + 0.05 * i), "time_error": 0.0, "memory_error": 0.0})
    out = plan_rescore.rescore({"profile": prof.to_json(), "rows": rows, "cluster": {"goodput_Bps": 1.2e8}})
    assert out["drift"] < 1e-6
    errors = sorted(0.04 * i / (1 + 0.04 * i) for i in range(6))
    assert out["summary"]["median_time_error"] == pytest.approx((errors[2] + errors[3]) / 2, abs=1e-4)
    assert out["summary"]["spearman_all"] > 0.5
    assert out["summary"]["median_memory_error"] == pytest.approx((0.10 + 0.15) / 2, abs=1e-4)   # 0.05 i, i = 0..5 twice
    slower = copy.deepcopy(prof)
    slower.values["op_s"] *= 3    # another model (profile): other predictions
    assert plan_rescore.rescore({"profile": prof.to_json(), "rows": rows, "cluster": {"goodput_Bps": 1.2e8}},
                                slower)["drift"] > 0.01


def test_memory_refit_scales_the_memory_bound_figures_and_rescore_carries_it():
    """A validation sounds the host's memory bandwidth beside its runs: with_memory scales every
    memory-bound figure by it (nothing else), and plan_rescore reproduces predictions made that way."""
    import copy

    from trainlib.benchmarks import bench_plan, plan_rescore
    from trainlib.planner.calibrate import MEMORY_BOUND, with_memory
    from trainlib.planner.profile import load

    prof = load("cpu")
    slow = with_memory(prof, 0.6 * prof["mem_Bps"], "test")
    for k in prof.values:
        assert slow[k] == pytest.approx(prof[k] * (0.6 if k in MEMORY_BOUND else 1.0))
    cluster = plan_rescore._cluster("local 1x2", None)
    fast_plans = {p.layout.label(): p for p in bench_plan.rank_layouts("wide-mlp", cluster, prof)}
    rows = []
    for i, p in enumerate(bench_plan.rank_layouts("wide-mlp", cluster, slow)):
        assert p.step_s > fast_plans[p.layout.label()].step_s      # the wide MLP is memory-bound here
        rows.append({"place": "local 1x2", "model": "wide-mlp", "planner_rank": i + 1, "layout": p.layout.label(),
                     "predicted_s": p.step_s, "measured_s": p.step_s, "all_s": [], "measured_bytes": p.peak_bytes,
                     "time_error": 0.0, "memory_error": 0.0, "predicted_breakdown": p.time.as_dict(),
                     "refit": {"compute_efficiency": slow["compute_efficiency"],
                               **{k: slow[k] for k in MEMORY_BOUND}}})
    result = {"profile": prof.to_json(), "rows": rows, "cluster": {}}
    assert plan_rescore.rescore(result)["drift"] < 1e-4      # efficiency is backed out by bisection
    bare = copy.deepcopy(rows)
    for r in bare:
        del r["refit"]
    assert plan_rescore.rescore({**result, "rows": bare})["drift"] > 0.01


def test_model_probe_refit_scales_the_compute_side_and_rescore_carries_it():
    """bench plan re-fits each group to its model's own single-device step: one factor on the compute-side
    rates (FLOPs, memory traffic, per-op costs), none on the collectives; plan_rescore reproduces it."""
    from trainlib.benchmarks import bench_plan, plan_rescore
    from trainlib.planner.calibrate import COMPUTE_SIDE, MEMORY_BOUND, with_model_probe
    from trainlib.planner.profile import load

    prof = load("cpu")
    spec = bench_plan.model_spec("gpt-default")
    single = step_time(spec, Layout(1, 1, 1), ClusterSpec(1, 1, "cpu", 10.0, 8.0), prof, 4).total
    refit = with_model_probe(prof, spec, 4, 1.3 * single, "test")
    assert refit.measured["model_slowdown"] == pytest.approx(1.3, rel=1e-6)
    assert step_time(spec, Layout(1, 1, 1), ClusterSpec(1, 1, "cpu", 10.0, 8.0), refit, 4).total \
        == pytest.approx(1.3 * single, rel=1e-6)
    assert all(refit[k] == prof[k] for k in prof.values if k not in COMPUTE_SIDE)
    cluster = plan_rescore._cluster("local 1x2", None)
    rows = [{"place": "local 1x2", "model": "gpt-default", "planner_rank": i + 1, "layout": p.layout.label(),
             "predicted_s": p.step_s, "measured_s": p.step_s, "all_s": [], "measured_bytes": p.peak_bytes,
             "time_error": 0.0, "memory_error": 0.0, "predicted_breakdown": p.time.as_dict(),
             "refit": {k: refit[k] for k in ("compute_efficiency", *MEMORY_BOUND, "op_s")}}
            for i, p in enumerate(bench_plan.rank_layouts("gpt-default", cluster, refit)[:8])]
    assert plan_rescore.rescore({"profile": prof.to_json(), "rows": rows, "cluster": {}})["drift"] < 1e-9


def test_probe_model_refits_the_profile_to_the_models_own_step(capsys):
    """--probe-model times the default GPT's single-device step on 2 real local ranks and re-fits the
    profile's compute side to it: the plan's single-device time model then gives that measured step."""
    from trainlib.plan_cli import main
    from trainlib.planner.calibrate import COMPUTE_SIDE

    assert main(["--probe-model", "--json", "--global-batch", "8", "--model.n_layer", "2"]) == 0
    out, err = capsys.readouterr()
    measured_ms = float(err.split(" took ")[1].split(" ms")[0])
    factor = float(err.split("compute side x")[1].split()[0])
    assert measured_ms > 0 and 0.2 <= factor <= 5.0
    prof = load("cpu")
    spec = ModelSpec.gpt(ModelConfig(n_layer=2))
    refit = Profile(prof.name, "cpu", True, dict(prof.values), {})
    for k in COMPUTE_SIDE:
        refit.values[k] = prof[k] * factor if k == "op_s" else prof[k] / factor
    single = step_time(spec, Layout(1, 1, 1), ClusterSpec(1, 1, "cpu", 10.0, 8.0), refit, 4).total
    if 0.2 < factor < 5.0:   # inside the bracket the fit reproduces the measurement (to the printed digits)
        assert single * 1e3 == pytest.approx(measured_ms, rel=0.01)
    plans = json.loads(out)["plans"]
    assert plans and all(p["step_s"] > 0 for p in plans)
