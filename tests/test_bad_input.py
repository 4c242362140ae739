"""Every bad value of every `trainlib` command: the exit code and one line that names the value and
the fix, and no traceback. Each row is the real CLI entry point (`trainlib.cli.main`) in its own
process, forked from this one after it imported every command (a row costs a fork, not a torch
import). Nothing here starts a rank: `trainlib train` and `trainlib launch` check everything
knowable before torchrun starts (trainlib/validate.py), which is what the rows prove; the rows
marked SINGLE run as one rank (RANK set), for the checks only a rank can make.
"""
from __future__ import annotations

import multiprocessing
import os
import sys

import pytest

pytestmark = pytest.mark.timeout(240)

SINGLE = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}  # run as one rank: no torchrun
# a tiny model, so that the few rows that get as far as a rank finish in well under a second
SMALL = ["--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2", "--model.seq_len", "16",
         "--train.batch_size", "2", "--train.corpus_bytes", "8192", "--train.metrics", "{tmp}/m.jsonl"]
TOKEN = {"TRAINLIB_PS_TOKEN": "t" * 64}

# (name, argv after `trainlib`, extra env, exit code, fragments of stderr: the value and the fix)
TRAIN = [
    # --- the launcher's own flags
    ("nproc", ["train", "--nproc-per-node", "0"], {}, 1, ["--nproc-per-node=0", ">= 1"]),
    ("nproc not int", ["train", "--nproc-per-node", "two"], {}, 1, ["--nproc-per-node", "invalid int value: 'two'"]),
    ("max restarts", ["train", "--max-restarts", "-1"], {}, 1, ["--max-restarts=-1", ">= 0"]),
    ("debug takes no value", ["train", "--debug=yes"], {}, 1, ["--debug", "ignored explicit argument 'yes'"]),
    ("config file", ["train", "--config", "/nonexistent/run.toml"], {}, 1, ["'/nonexistent/run.toml' does not exist"]),
    ("bad toml", ["train", "--config", "{bad_toml}"], {}, 1, ["is not valid TOML"]),
    ("toml not a table", ["train", "--config", "{flat_toml}"], {}, 1, ["top-level key 'steps'", "[section] table"]),
    ("unknown section", ["train", "--optim.lr", "1"], {}, 1, ["unknown config section 'optim'", "train"]),
    ("unknown key", ["train", "--train.learning_rate", "1"], {}, 1, ["unknown key train.learning_rate", "lr"]),
    ("bare arg", ["train", "steps=3"], {}, 1, ["unexpected argument 'steps=3'", "--section.key=value"]),
    ("missing value", ["train", "--train.steps"], {}, 1, ["--train.steps needs a value", "--train.steps=VALUE"]),
    # --- [train]
    ("steps zero", ["train", "--train.steps", "0"], {}, 1, ["train.steps=0", "must be > 0"]),
    ("steps not int", ["train", "--train.steps=ten"], {}, 1, ["train.steps='ten'", "not a valid int"]),
    ("batch zero", ["train", "--train.batch_size", "0"], {}, 1, ["train.batch_size=0", "must be > 0"]),
    ("batch over dp", ["train", "--train.batch_size", "3"], {}, 1,
     ["train.batch_size=3 is not divisible by dp=2", "--train.batch_size 4"]),
    ("lr nan", ["train", "--train.lr", "nan"], {}, 1, ["train.lr='nan' is not a finite number"]),
    ("lr inf", ["train", "--train.lr=inf"], {}, 1, ["train.lr='inf' is not a finite number"]),
    ("lr negative", ["train", "--train.lr", "-0.1"], {}, 1, ["train.lr=-0.1", "must be > 0"]),
    ("lr zero", ["train", "--train.lr", "0"], {}, 1, ["train.lr=0.0", "must be > 0"]),
    ("weight decay", ["train", "--train.weight_decay", "-1"], {}, 1, ["train.weight_decay=-1.0", ">= 0"]),
    ("warmup", ["train", "--train.warmup_steps", "-2"], {}, 1, ["train.warmup_steps=-2", ">= 0"]),
    ("grad clip", ["train", "--train.grad_clip", "-1"], {}, 1, ["train.grad_clip=-1.0", ">= 0"]),
    ("grad clip nan", ["train", "--train.grad_clip", "nan"], {}, 1, ["train.grad_clip='nan' is not a finite"]),
    ("seed", ["train", "--train.seed", "x"], {}, 1, ["train.seed='x' is not a valid int"]),
    ("log every", ["train", "--train.log_every", "0"], {}, 1, ["train.log_every=0", "must be > 0"]),
    ("metrics is a dir", ["train", "--train.metrics", "{tmp}"], {}, 1, ["train.metrics=", "is a directory"]),
    ("metrics under a file", ["train", "--train.metrics", "{a_file}/sub/m.jsonl"], {}, 1,
     ["train.metrics=", "a_file' is a file, not a directory"]),
    ("corpus", ["train", "--train.corpus_bytes", "0"], {}, 1, ["train.corpus_bytes=0", "must be > 0"]),
    ("corpus too small", ["train", "--train.corpus_bytes", "1000"], {}, 1,
     ["train.corpus_bytes=1000 holds 7 windows", "--train.corpus_bytes to at least 4097"]),
    ("nonfinite", ["train", "--train.nonfinite", "ignore"], {}, 1, ["train.nonfinite='ignore'", "skip, raise"]),
    # --- [model]
    ("heads over d_model", ["train", "--model.d_model", "130"], {}, 1, ["model.d_model=130", "not divisible by model.n_head=4"]),
    ("heads over tp", ["train", "--mesh.tp", "2", "--model.n_head", "3", "--model.d_model", "48"], {}, 1,
     ["model.n_head=3 is not divisible by tp=2", "--model.n_head to a multiple of 2"]),
    ("vocab over tp", ["train", "--mesh.tp", "2", "--model.vocab_size", "257"], {}, 1,
     ["model.vocab_size=257 is not divisible by tp=2"]),
    ("vocab", ["train", "--model.vocab_size", "100"], {}, 1, ["model.vocab_size=100", "256"]),
    ("layers", ["train", "--model.n_layer", "0"], {}, 1, ["model.n_layer=0", "must be > 0"]),
    ("layers over pp", ["train", "--nproc-per-node", "4", "--mesh.pp", "4", "--model.n_layer", "1",
                        "--train.batch_size", "8"], {}, 1,
     ["model.n_layer=1 gives 3 pipeline layers", "--model.n_layer >= 2"]),
    ("seq len", ["train", "--model.seq_len", "-1"], {}, 1, ["model.seq_len=-1", "must be > 0"]),
    # --- [mesh]
    ("mesh product", ["train", "--nproc-per-node", "3", "--mesh.dp", "2"], {}, 1, ["dp(2)", "world_size 3", "dp=-1"]),
    ("mesh divisor", ["train", "--nproc-per-node", "2", "--mesh.tp", "3"], {}, 1, ["tp(3)", "not divisible by 3"]),
    ("mesh pp zero", ["train", "--mesh.pp", "0"], {}, 1, ["pp=0 must be a positive integer"]),
    ("schedule name", ["train", "--mesh.pp", "2", "--mesh.schedule", "2f2b"], {}, 1,
     ["mesh.schedule='2f2b'", "gpipe, 1f1b, interleaved, zb-h1"]),
    ("schedule name pp1", ["train", "--mesh.schedule", "2f2b"], {}, 1, ["mesh.schedule='2f2b' is not one of"]),
    ("interleaved", ["train", "--mesh.pp", "2", "--mesh.schedule", "interleaved", "--mesh.microbatches", "3",
                     "--train.batch_size", "6"], {}, 1, ["interleaved 1F1B needs microbatches (3) to be a multiple of pp (2)"]),
    ("microbatches", ["train", "--mesh.pp", "2", "--mesh.microbatches", "3"], {}, 1,
     ["train.batch_size=32 / dp 1 = 32 sequences per rank is not divisible by 3 microbatches"]),
    ("microbatches negative", ["train", "--mesh.pp", "2", "--mesh.microbatches", "-1"], {}, 1,
     ["mesh.microbatches=-1 must be >= 0"]),
    # --- [sync]
    ("sync kind", ["train", "--sync.kind", "nccl2"], {}, 1, ["sync.kind='nccl2'", "allreduce"]),
    ("ddp with tp", ["train", "--sync.kind", "ddp", "--mesh.tp", "2"], {}, 1, ["sync.kind=ddp", "--sync.kind allreduce"]),
    ("bucket", ["train", "--sync.bucket_mb", "0"], {}, 1, ["sync.bucket_mb=0.0", "must be > 0"]),
    ("compress", ["train", "--sync.compress", "int8"], {}, 1, ["sync.compress='int8'", "none, bf16, fp16"]),
    ("shard stage", ["train", "--dp.shard", "zero2"], {}, 1, ["dp.shard='zero2'", "optimizer, gradients, parameters"]),
    ("precision", ["train", "--train.precision", "int8"], {}, 1, ["train.precision='int8'", "fp32, bf16, fp16"]),
    ("activation checkpointing", ["train", "--train.activation_checkpointing", "some"], {}, 1,
     ["train.activation_checkpointing='some'", "none, full, selective"]),
    ("shard with ps", ["train", "--sync.kind", "ps", "--dp.shard", "optimizer"], {}, 1,
     ["dp.shard=optimizer needs sync.kind=allreduce", "--sync.kind allreduce"]),
    ("bf16 with ddp", ["train", "--sync.kind", "ddp", "--train.precision", "bf16"], {}, 1,
     ["train.precision=bf16 needs sync.kind=allreduce"]),
    ("async ps with pp", ["train", "--nproc-per-node", "4", "--sync.kind", "ps", "--sync.mode", "async", "--mesh.pp",
                          "2"], {}, 1, ["sync.mode=async cannot drive pipeline stages (pp=2)", "--sync.mode sync"]),
    ("compress with ps", ["train", "--sync.kind", "ps", "--sync.compress", "bf16"], {}, 1,
     ["sync.compress=bf16 applies to sync.kind=allreduce", "--sync.kind allreduce"]),
    ("compress with ddp", ["train", "--sync.kind", "ddp", "--sync.compress", "fp16"], {}, 1,
     ["sync.compress=fp16 is not supported with sync.kind=ddp"]),
    ("transport", ["train", "--sync.transport", "tcp"], {}, 1, ["sync.transport='tcp'", "auto, torch, mpi, shm"]),
    ("transport mpi", ["train", "--sync.transport", "mpi"], {}, 1, ["sync.transport=mpi needs ranks started by mpiexec"]),
    ("transport mpi compress", ["train", "--sync.transport", "mpi", "--sync.compress", "bf16"],
     {"OMPI_COMM_WORLD_RANK": "0"}, 1, ["sync.compress=bf16 is not supported by sync.transport=mpi"]),
    ("transport hierarchical", ["train", "--sync.transport", "hierarchical"], {}, 1,
     ["sync.transport=hierarchical needs ranks on >= 2 nodes", "--sync.transport shm"]),
    ("transport with ps", ["train", "--sync.kind", "ps", "--sync.transport", "shm"], {}, 1,
     ["sync.transport=shm applies to sync.kind=allreduce, not ps"]),
    ("mode", ["train", "--sync.kind", "ps", "--sync.mode", "eventual"], {}, 1, ["sync.mode='eventual'", "sync, async"]),
    ("mode with allreduce", ["train", "--sync.mode", "async"], {}, 1,
     ["sync.mode='async' only applies to sync.kind=ps, not allreduce"]),
    ("staleness with sync", ["train", "--sync.kind", "ps", "--sync.staleness", "2"], {}, 1,
     ["sync.staleness=2 needs sync.mode=async"]),
    ("staleness with allreduce", ["train", "--sync.mode", "async", "--sync.staleness", "2"], {}, 1,
     ["only applies to sync.kind=ps"]),
    ("staleness negative", ["train", "--sync.kind", "ps", "--sync.mode", "async", "--sync.staleness", "-1"], {}, 1,
     ["sync.staleness=-1", ">= 0"]),
    ("partition", ["train", "--sync.kind", "ps", "--sync.partition_mb", "0"], {}, 1, ["sync.partition_mb=0.0", "> 0"]),
    ("partition cap", ["train", "--sync.kind", "ps", "--sync.partition_mb", "100"], {}, 1,
     ["sync.partition_mb=100.0 exceeds the servers' frame cap of 64 MB"]),
    ("servers syntax", ["train", "--sync.kind", "ps", "--sync.servers", "10.0.0.1"], TOKEN, 1,
     ["sync.servers: '10.0.0.1' is not HOST:PORT"]),
    ("servers port", ["train", "--sync.kind", "ps", "--sync.servers", "10.0.0.1:70000"], TOKEN, 1,
     ["'10.0.0.1:70000' is not HOST:PORT with a port in 1..65535"]),
    ("servers resolve", ["train", "--sync.kind", "ps", "--sync.servers", "ps-0.nowhere.invalid:5555"], TOKEN, 1,
     ["host 'ps-0.nowhere.invalid'", "does not resolve"]),
    ("servers with allreduce", ["train", "--sync.servers", "127.0.0.1:5555"], {}, 1,
     ["sync.servers='127.0.0.1:5555' only applies to sync.kind=ps"]),
    ("servers no token", ["train", "--sync.kind", "ps", "--sync.servers", "127.0.0.1:5555"], {}, 1,
     ["no token", "TRAINLIB_PS_TOKEN"]),
    ("ps addrs env", ["train", "--sync.kind", "ps"], {**TOKEN, "TRAINLIB_PS_ADDRS": "127.0.0.1:x"}, 1,
     ["TRAINLIB_PS_ADDRS: '127.0.0.1:x' is not HOST:PORT"]),
    ("ps token short", ["train", "--sync.kind", "ps"], {"TRAINLIB_PS_TOKEN": "short"}, 1,
     ["has 5 characters; use at least"]),
    # --- [checkpoint]
    ("ckpt every", ["train", "--checkpoint.every", "0"], {}, 1, ["checkpoint.every=0", "must be > 0"]),
    ("ckpt keep", ["train", "--checkpoint.keep", "-1"], {}, 1, ["checkpoint.keep=-1", "must be > 0"]),
    ("ckpt async", ["train", "--checkpoint.async", "maybe"], {}, 1, ["checkpoint.async='maybe'", "not a valid bool"]),
    ("ckpt s3 no bucket", ["train", "--checkpoint.dir", "s3://"], {}, 1, ["checkpoint.dir='s3://' names no bucket",
                                                                          "s3://BUCKET/PREFIX"]),
    ("ckpt dir is file", ["train", "--checkpoint.dir", "{a_file}"], {}, 1, ["exists and is not a directory", "directory"]),
    ("ckpt dir nested under a file", ["train", "--checkpoint.dir", "{a_file}/x/y"], {}, 1,
     ["checkpoint.dir=", "a_file' is a file, not a directory"]),
    ("ckpt dir unwritable", ["train", "--checkpoint.dir", "/proc/trainlib/ck"], {}, 1,
     ["checkpoint.dir='/proc/trainlib/ck' cannot be created", "choose"]),
    ("ckpt other layout", ["train", *SMALL, "--mesh.tp", "2", "--checkpoint.dir", "{ck_dp2}"], {}, 1,
     ["holds step 1, saved by 2 ranks as pp=1 dp=2 tp=1", "this run is 2 ranks as pp=1 dp=1 tp=2",
      "--checkpoint.dir at a new directory"]),
    ("ckpt other world", ["train", *SMALL, "--nproc-per-node", "4", "--train.batch_size", "4", "--checkpoint.dir",
                          "{ck_dp2}"], {}, 1,
     ["saved by 2 ranks as pp=1 dp=2 tp=1", "this run is 4 ranks"]),
    ("ckpt other model", ["train", *SMALL, "--model.d_model", "64", "--checkpoint.dir", "{ck_dp2}"], {}, 1,
     ["saved by 2 ranks with another model shape", "blocks.0.attn.proj.bias [32], this run expects [64]"]),
    # --- [observe], [profile]: the sinks and the trace directory, checked before launch
    ("prometheus address", ["train", "--observe.prometheus", "host:http"], {}, 1,
     ["observe.prometheus='host:http' is not HOST:PORT", "0.0.0.0:9100"]),
    ("mlflow file store", ["train", "--observe.mlflow", "file://{tmp}/mlruns"], {"MLFLOW_ALLOW_FILE_STORE": "no"}, 1,
     ["observe.mlflow='file://", "MLFLOW_ALLOW_FILE_STORE=true"]),
    ("tensorboard under a file", ["train", "--observe.tensorboard", "{a_file}/tb"], {}, 1,
     ["observe.tensorboard=", "a_file' is a file, not a directory"]),
    ("breakdown", ["train", "--observe.breakdown", "maybe"], {}, 1, ["observe.breakdown='maybe'", "not a valid bool"]),
    ("mlflow experiment", ["train", "--observe.mlflow", "http://127.0.0.1:5000", "--observe.mlflow_experiment= "], {}, 1,
     ["observe.mlflow_experiment=' ' is empty", "--observe.mlflow_experiment NAME"]),
    ("profile steps", ["train", "--profile.steps", "12"], {}, 1, ["profile.steps='12' is not A:B", "10:12"]),
    ("profile dir under a file", ["train", "--profile.steps", "1:2", "--profile.dir", "{a_file}/p"], {}, 1,
     ["profile.dir=", "a_file' is a file, not a directory"]),
    # --- environment, checked before launch (launching process) and in a rank (SINGLE)
    ("env timeout", ["train"], {"TRAINLIB_TIMEOUT_S": "soon"}, 1, ["TRAINLIB_TIMEOUT_S='soon'", "unset it"]),
    ("env timeout sign", ["train"], {**SINGLE, "TRAINLIB_TIMEOUT_S": "-5"}, 1, ["TRAINLIB_TIMEOUT_S='-5'", "positive"]),
    ("env backend", ["train"], {"TRAINLIB_BACKEND": "nccl3"}, 1, ["unknown backend 'nccl3'", "TRAINLIB_BACKEND"]),
    ("env nccl on cpu", ["train"], {**SINGLE, "TRAINLIB_BACKEND": "nccl", "TRAINLIB_DEVICE": "cpu"}, 1,
     ["backend nccl needs a CUDA device", "gloo"]),
    ("env fault spec", ["train"], {"TRAINLIB_FAULT_KILL_AT_STEP": "soon"}, 1,
     ["TRAINLIB_FAULT_KILL_AT_STEP='soon'", "RANK:STEP[:PHASE]"]),
    ("env rank", ["train", *SMALL], {"RANK": "one", "WORLD_SIZE": "2"}, 1, ["RANK='one' is not an integer"]),
    ("env master", ["train", *SMALL], {"RANK": "1", "WORLD_SIZE": "2"}, 1, ["MASTER_ADDR", "torchrun"]),
    ("env rank range", ["train", *SMALL],
     {"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, 1, ["rank 2 is outside world_size 2"]),
    ("in rank: batch over dp", ["train", *SMALL, "--train.batch_size", "3"],
     {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, 1, ["train.batch_size=3 is not divisible by dp=2"]),
]

LAUNCH = [
    ("no command", ["launch"], {}, 1, ["usage: trainlib launch", "no command to launch", "-- trainlib train"]),
    ("only --", ["launch", "--"], {}, 1, ["no command to launch"]),
    ("unknown flag", ["launch", "--bogus", "--", "trainlib", "train"], {}, 1, ["usage:", "unrecognized arguments: --bogus"]),
    ("nproc", ["launch", "--nproc-per-node", "0", "--", "trainlib", "train"], {}, 1, ["--nproc-per-node=0 must be >= 1"]),
    ("nproc not int", ["launch", "--nproc-per-node", "x", "--", "trainlib", "train"], {}, 1, ["invalid int value: 'x'"]),
    ("dry-run takes no value", ["launch", "--dry-run=1", "--", "trainlib", "train"], {}, 1, ["ignored explicit argument"]),
    ("quiet takes no value", ["launch", "--quiet=1", "--", "trainlib", "train"], {}, 1, ["ignored explicit argument"]),
    ("train mesh", ["launch", "--dry-run", "--nproc-per-node", "2", "--", "trainlib", "train", "--mesh.tp", "3"], {}, 1,
     ["trainlib launch: error: mesh:", "tp(3)", "world_size 2"]),
    ("train value", ["launch", "--quiet", "--", "trainlib", "train", "--train.lr", "nan"], {}, 1,
     ["train.lr='nan' is not a finite number"]),
    ("train -m form", ["launch", "--quiet", "--", "python", "-m", "trainlib.cli", "train", "--sync.kind", "x"], {}, 1,
     ["sync.kind='x'"]),
    ("train bad flag", ["launch", "--quiet", "--", "trainlib", "train", "--nproc-per-node", "x"], {}, 1,
     ["bad arguments"]),
    ("pod env", ["launch", "--dry-run", "--", "trainlib", "train"], {"RANK": "0", "WORLD_SIZE": "x"}, 1,
     ["WORLD_SIZE"]),
    # values the layout ignores and that only tune something absent: one warning line, and the job goes on
    ("warn schedule pp1", ["launch", "--dry-run", "--", "trainlib", "train", "--mesh.schedule", "gpipe"], {}, 0,
     ["trainlib launch: warning: mesh.schedule='gpipe' has no effect with pp=1 (no pipeline); drop it"]),
    ("warn microbatches pp1", ["launch", "--dry-run", "--", "trainlib", "train", "--mesh.microbatches", "4"], {}, 0,
     ["warning: mesh.microbatches=4 has no effect with pp=1"]),
    ("warn partition allreduce", ["launch", "--dry-run", "--", "trainlib", "train", "--sync.partition_mb", "8"], {}, 0,
     ["warning: sync.partition_mb=8.0 has no effect with sync.kind=allreduce"]),
    ("warn every without dir", ["launch", "--dry-run", "--", "trainlib", "train", "--checkpoint.every", "10"], {}, 0,
     ["warning: checkpoint.every=10 has no effect without checkpoint.dir"]),
    ("warn warmup", ["launch", "--dry-run", "--", "trainlib", "train", "--train.steps", "10",
                     "--train.warmup_steps", "50"], {}, 0, ["warning: train.warmup_steps=50 >= train.steps=10"]),
    # in a pod the servers' pods may not exist yet: their names are not looked up there (the ranks retry)
    ("pod does not resolve servers", ["launch", "--dry-run", "--", "trainlib", "train", "--sync.kind", "ps",
                                      "--sync.servers", "ps-0.nowhere.invalid:5555"], TOKEN, 0, ['"mode": "torchrun"']),
]

K8S = [(f"k8s {name}", ["k8s", *argv], {}, 1, needles) for name, argv, needles in [
    ("no kind", [], ["the following arguments are required: kind"]),
    ("bad kind", ["tfjob"], ["invalid choice: 'tfjob'"]),
    ("no name", ["pytorchjob", "--image", "i"], ["--name is required"]),
    ("no image", ["pytorchjob", "--name", "gpt"], ["--image is required"]),
    ("name", ["pytorchjob", "--name", "GPT_run", "--image", "i"], ["--name='GPT_run' is not a DNS-1035 label", "gpt-run"]),
    ("namespace", ["pytorchjob", "--name", "g", "--image", "i", "--namespace", "Team A"], ["--namespace='Team A'"]),
    ("nodes", ["pytorchjob", "--name", "g", "--image", "i", "--nodes", "0"], ["--nodes=0 must be >= 1"]),
    ("nodes not int", ["pytorchjob", "--name", "g", "--image", "i", "--nodes", "two"], ["invalid int value: 'two'"]),
    ("gpus", ["pytorchjob", "--name", "g", "--image", "i", "--gpus-per-node", "-1"], ["--gpus-per-node=-1 must be >= 0"]),
    ("efa", ["pytorchjob", "--name", "g", "--image", "i", "--efa", "-2"], ["--efa=-2 must be >= 0"]),
    ("neuron cores", ["pytorchjob", "--name", "g", "--image", "i", "--neuron-cores", "3"],
     ["--neuron-cores 3 is not a multiple of --neuron-cores-per-device 2"]),
    ("neuron per device", ["pytorchjob", "--name", "g", "--image", "i", "--neuron-cores-per-device", "0"],
     ["--neuron-cores-per-device=0 must be >= 1"]),
    ("gpus and neuron", ["pytorchjob", "--name", "g", "--image", "i", "--gpus-per-node", "8", "--neuron-cores", "2"],
     ["exclude each other"]),
    ("gang", ["pytorchjob", "--name", "g", "--image", "i", "--gang", "yunikorn"], ["invalid choice: 'yunikorn'"]),
    ("kueue no queue", ["pytorchjob", "--name", "g", "--image", "i", "--gang", "kueue"], ["--gang kueue needs --queue"]),
    ("queue without gang", ["pytorchjob", "--name", "g", "--image", "i", "--queue", "q"],
     ["--queue q has no effect without --gang"]),
    ("cluster queue without kueue", ["pytorchjob", "--name", "g", "--image", "i", "--gang", "volcano",
                                     "--cluster-queue", "cq"], ["--cluster-queue cq only applies to --gang kueue"]),
    ("elastic syntax", ["pytorchjob", "--name", "g", "--image", "i", "--elastic", "4-2"], ["--elastic '4-2' must be MIN:MAX"]),
    ("elastic order", ["pytorchjob", "--name", "g", "--image", "i", "--elastic", "4:2"], ["1 <= MIN <= MAX"]),
    ("elastic mpijob", ["mpijob", "--name", "g", "--image", "i", "--elastic", "1:2"], ["--elastic is for pytorchjob"]),
    ("max restarts", ["pytorchjob", "--name", "g", "--image", "i", "--max-restarts", "-1"], ["--max-restarts=-1 must be >= 0"]),
    ("ps servers", ["pytorchjob", "--name", "g", "--image", "i", "--ps-servers", "-1"], ["--ps-servers=-1 must be >= 0"]),
    ("ps port", ["pytorchjob", "--name", "g", "--image", "i", "--ps-servers", "1", "--ps-port", "70000"],
     ["--ps-port=70000", "1..65535"]),
    ("ps port without servers", ["pytorchjob", "--name", "g", "--image", "i", "--ps-port", "5555"],
     ["--ps-port 5555 has no effect without --ps-servers"]),
    ("ps secret without servers", ["pytorchjob", "--name", "g", "--image", "i", "--ps-token-secret", "s"],
     ["--ps-token-secret s has no effect without --ps-servers"]),
    ("shm size", ["pytorchjob", "--name", "g", "--image", "i", "--shm-size", "lots"], ["--shm-size='lots'", "16Gi"]),
    ("shm over memory", ["pytorchjob", "--name", "g", "--image", "i", "--shm-size", "8Gi", "--memory", "4Gi"],
     ["/dev/shm 8Gi >= pod memory 4Gi"]),
    ("cpu", ["pytorchjob", "--name", "g", "--image", "i", "--cpu", "many"], ["--cpu='many'", "e.g. 8 or 500m"]),
    ("memory", ["pytorchjob", "--name", "g", "--image", "i", "--memory", "big"], ["--memory='big' is not a memory", "16Gi"]),
    ("instance type", ["pytorchjob", "--name", "g", "--image", "i", "--instance-type", "p9.huge"], ["p9.huge"]),
    ("instance too small", ["pytorchjob", "--name", "g", "--image", "i", "--instance-type", "p5.48xlarge",
                            "--gpus-per-node", "9"], ["--gpus-per-node asks for 9 GPUs but p5.48xlarge has 8"]),
    ("zone", ["pytorchjob", "--name", "g", "--image", "i", "--zone", "us east"], ["--zone='us east'"]),
    ("from-config missing", ["pytorchjob", "--from-config", "/nonexistent/run.toml"], ["/nonexistent/run.toml"]),
    ("from-config bad toml", ["pytorchjob", "--from-config", "{bad_toml}"], ["is not valid TOML"]),
    ("from-config key", ["pytorchjob", "--from-config", "{k8s_toml}"], ["[k8s] keys ['gpus']", "gpus_per_node"]),
    ("from-config train value", ["pytorchjob", "--from-config", "{k8s_train_toml}"], ["train.lr='nan'"]),
    ("json takes no value", ["pytorchjob", "--name", "g", "--image", "i", "--json=1"], ["ignored explicit argument"]),
]]

PS_SERVER = [(f"ps-server {name}", ["ps-server", *argv], env, 1, needles) for name, argv, env, needles in [
    ("no token", [], {}, ["token"]),
    ("bind syntax", ["--bind", "nohost"], TOKEN, ["nohost"]),
    ("token file", ["--token-file", "/nonexistent/token"], {}, ["cannot read the token file '/nonexistent/token'"]),
    ("insecure off loopback", ["--insecure", "--bind", "0.0.0.0:0"], {}, ["loopback"]),
    ("max mb not a number", ["--max-mb", "lots"], TOKEN, ["invalid float value: 'lots'"]),
    ("max keys not int", ["--max-keys", "x"], TOKEN, ["invalid int value: 'x'"]),
    ("conn auth", ["--conn-auth", "tls"], TOKEN, ["invalid choice: 'tls'"]),
    ("worker timeout not a number", ["--worker-timeout", "soon"], TOKEN, ["invalid float value: 'soon'"]),
    ("max clients not int", ["--max-clients", "many"], TOKEN, ["invalid int value: 'many'"]),
    ("unknown flag", ["--port", "5555"], TOKEN, ["unrecognized arguments: --port 5555"]),
    ("max clients", ["--max-clients", "0"], TOKEN, ["--max-clients=0 must be >= 1"]),
    ("port out of range", ["--bind", "127.0.0.1:99999"], TOKEN, ["--bind='127.0.0.1:99999'", "0..65535"]),
    ("max mb zero", ["--max-mb", "0"], TOKEN, ["--max-mb=0.0 must be > 0"]),
    ("max keys zero", ["--max-keys", "0"], TOKEN, ["--max-keys=0 must be >= 1"]),
    ("worker timeout zero", ["--worker-timeout", "0"], TOKEN, ["--worker-timeout=0.0 must be > 0"]),
    ("state dir in /proc", ["--state-dir", "/proc/ps"], TOKEN, ["--state-dir='/proc/ps'", "writable directory"]),
    ("bind an address not here", ["--bind", "192.0.2.1:5555"], TOKEN, ["Cannot assign requested address"]),
]]

BENCH = [(f"bench {name}", ["bench", *argv], {}, 1, needles) for name, argv, needles in [
    ("no name", [], ["the following arguments are required: name"]),
    ("unknown name", ["nccl"], ["invalid choice: 'nccl'"]),
    ("unwritable json path", ["checkpoint", "--quick", "--json", "/proc/bench.json"], ["--json='/proc/bench.json'"]),
    ("json path is a folder", ["checkpoint", "--quick", "--json", "/tmp"], ["--json='/tmp': cannot write there"]),
    ("flag for a benchmark without options", ["dp", "--reps", "3"], ["unrecognized arguments for benchmark dp: --reps 3"]),
    ("pp option", ["pp", "--reps", "x"], ["invalid int value: 'x'"]),
    ("ps option", ["ps", "--nodes", "x"], ["invalid int value: 'x'"]),
    ("table flag", ["table", "--bogus"], ["unrecognized arguments: --bogus"]),
]]

OTHER = [
    ("unknown command", ["checkpoints", "ls"], {}, 1, ["unknown command 'checkpoints'", "usage: trainlib COMMAND"]),
]

CASES = TRAIN + LAUNCH + K8S + PS_SERVER + BENCH + OTHER
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _cli_case(argv: list[str], env: dict[str, str], err_path: str) -> None:
    """One row in a fresh process: the CLI's stderr goes to err_path and its return code becomes
    the process's exit code (an escaping exception is 99, never an expected code)."""
    for k in [k for k in os.environ if k.startswith(("TRAINLIB_", "TORCHELASTIC_", "PET_", "OMPI_", "PMI"))
              or k in _LAUNCH_VARS]:
        del os.environ[k]
    os.environ.update(env)
    fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    os.dup2(fd, 1)  # usage and argparse messages: wherever they go, the row reads them
    sys.stderr = os.fdopen(2, "w", buffering=1)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    try:
        from trainlib import cli

        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        rc = 99
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(rc)


def _files(tmp_path) -> dict[str, str]:
    (tmp_path / "bad.toml").write_text("[train\nsteps = 3\n")
    (tmp_path / "flat.toml").write_text("steps = 3\n")
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "k8s.toml").write_text('[k8s]\nname = "g"\nimage = "i"\ngpus = 8\n')
    (tmp_path / "k8s_train.toml").write_text('[k8s]\nname = "g"\nimage = "i"\n[train]\nlr = nan\n')
    return {"{tmp}": str(tmp_path), "{bad_toml}": str(tmp_path / "bad.toml"),
            "{flat_toml}": str(tmp_path / "flat.toml"), "{a_file}": str(tmp_path / "a_file"),
            "{k8s_toml}": str(tmp_path / "k8s.toml"), "{k8s_train_toml}": str(tmp_path / "k8s_train.toml"),
            "{ck_dp2}": str(tmp_path / "ck_dp2")}


def _dp2_checkpoint(root) -> None:
    """A real checkpoint as 2 dp ranks of the SMALL model would save it (no ranks: save() takes
    rank/world_size explicitly, and rank 0's shard is all the pre-launch check reads)."""
    from trainlib.checkpoint import save
    from trainlib.config import load_config
    from trainlib.trainer import build_model

    cfg = load_config(None, [a.replace("{tmp}", str(root)) for a in SMALL])
    state = {"model": build_model(cfg).state_dict()}
    save(root / "ck_dp2", 1, state, rank=0, world_size=1, save_rng=False)
    manifest = root / "ck_dp2" / "step_00000001" / "MANIFEST.json"  # as if a second rank had saved too
    import hashlib
    import json

    outer = json.loads(manifest.read_text())
    outer["body"]["world_size"] = 2
    body = json.dumps(outer["body"], sort_keys=True, separators=(",", ":")).encode()
    outer["sha256"] = hashlib.sha256(body).hexdigest()
    manifest.write_text(json.dumps(outer))


def _substitute(arg: str, subs: dict[str, str]) -> str:
    for key, value in subs.items():
        arg = arg.replace(key, value)
    return arg


def _run(cases, tmp_path) -> list[str]:

    subs = _files(tmp_path)
    # fork this process, which has imported every command's module: a row costs a fork (~10 ms), not
    # the ~0.7 s of imports a forkserver child pays. The rows never start threads or process groups.
    import trainlib.benchmarks.harness  # noqa: F401
    import trainlib.cli  # noqa: F401
    import trainlib.launchers.k8s  # noqa: F401
    import trainlib.launchers.launch  # noqa: F401
    import trainlib.sync.ps.server  # noqa: F401
    import trainlib.trainer  # noqa: F401
    from trainlib.config import load_config
    from trainlib.validate_checkpoint import _meta_model

    _meta_model(load_config())  # torch's first use of the meta device costs ~1.5 s: pay it once, here
    ctx = multiprocessing.get_context("fork")
    problems = []
    for i, (name, argv, env, code, needles) in enumerate(cases):
        argv = [_substitute(a, subs) for a in argv]
        err_path = tmp_path / f"case{i}.err"
        p = ctx.Process(target=_cli_case, args=(argv, {"TRAINLIB_NO_PROGRESS": "1", **env}, str(err_path)))
        p.start()
        p.join(30)
        if p.is_alive():
            p.kill()
            p.join()
            problems.append(f"{name}: still running after 30 s")
            continue
        err = err_path.read_text()
        last = err.strip().splitlines()[-1] if err.strip() else ""
        if p.exitcode != code or not all(n in err for n in needles):
            problems.append(f"{name}: exit {p.exitcode}, wanted {code} and {needles}; last line: {last!r}")
        elif "Traceback" in err:
            problems.append(f"{name}: a traceback instead of a one-line error: {last!r}")
    return problems


@pytest.mark.parametrize("table", ["train", "launch", "k8s", "ps-server", "bench"])
def test_bad_input_table(table, tmp_path):
    cases = {"train": TRAIN + OTHER, "launch": LAUNCH, "k8s": K8S, "ps-server": PS_SERVER, "bench": BENCH}[table]
    if table == "train":
        _dp2_checkpoint(tmp_path)
    problems = _run(cases, tmp_path)
    assert not problems, "\n".join(problems)


def test_every_train_option_has_a_row():
    """A new option without a bad-value row fails here: every flag is a promise (STYLE.md)."""
    from trainlib.config import _sections
    from dataclasses import fields

    argv_text = " ".join(" ".join(argv) for _, argv, _, _, _ in TRAIN)
    keys = [f"--{s}.{f.name.rstrip('_')}" for s, cls in _sections().items() for f in fields(cls)]
    missing = [k for k in keys + ["--nproc-per-node", "--max-restarts", "--debug", "--config"] if k not in argv_text]
    assert not missing, f"no bad-input row for {missing}"


def test_rank_error_is_reported_once(tmp_path):
    """A value only a rank can find bad (lr 1e30 turns the gradients to nan; nonfinite=raise):
    both ranks fail, and the job says so once, as its last line, without a traceback."""
    import subprocess

    argv = [_substitute(a, {"{tmp}": str(tmp_path)}) for a in SMALL]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINLIB_") and k not in _LAUNCH_VARS}
    proc = subprocess.run([sys.executable, "-m", "trainlib.cli", "train", *argv, "--train.steps", "3",
                           "--train.lr", "1e30", "--train.warmup_steps", "0", "--train.nonfinite", "raise"],
                          env={**env, "TRAINLIB_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert last.startswith("trainlib train: error: step 2: gradient norm is nan; lower train.lr") and "(rank " in last
    assert proc.stderr.count("gradient norm is") == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]


def _rank0_shapes(layouts: list[dict]) -> list[dict]:
    from trainlib.config import load_config
    from trainlib.mesh import Mesh
    from trainlib.trainer import build_model, wrap_parallel

    out = []
    for mesh_args in layouts:
        cfg = load_config(None, [*SMALL[:8], "--model.n_layer", "2", "--train.batch_size", "4",
                                 *[f"--mesh.{k}={v}" for k, v in mesh_args.items()]])
        mesh = Mesh(pp=cfg.mesh.pp, dp=cfg.mesh.dp, tp=cfg.mesh.tp)
        model = wrap_parallel(build_model(cfg), cfg, mesh)
        out.append({k: tuple(t.shape) for k, t in model.module.state_dict().items()})
        model.close()
    return out


def test_checkpoint_fingerprint_matches_parallelize():
    """The pre-launch checkpoint check predicts rank 0's shard from the config alone; if that
    prediction drifted from what tl.parallelize builds, a valid resume would be refused."""
    from trainlib.config import load_config
    from trainlib.mesh import MeshLayout
    from trainlib.testing import run_ranks
    from trainlib.validate_checkpoint import _meta_model, expected_rank0_shapes

    layouts = [{"tp": 2}, {"pp": 2}, {"pp": 2, "schedule": "interleaved"}]
    got = run_ranks(_rank0_shapes, 2, layouts, timeout_s=90)[0]
    model = _meta_model(load_config(None, [*SMALL[:8], "--model.n_layer", "2"]))
    for mesh_args, shapes in zip(layouts, got):
        layout = MeshLayout.build(2, mesh_args.get("pp", 1), -1, mesh_args.get("tp", 1))
        virtual = 2 if mesh_args.get("schedule") == "interleaved" else 1
        assert expected_rank0_shapes(model, layout, virtual) == shapes, mesh_args
