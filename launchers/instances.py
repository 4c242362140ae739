"""EC2 instance facts for sizing pods: accelerators, NeuronCores, EFA interfaces, host memory, vCPUs.

One table serves `trainlib k8s --instance-type` (resources, memory, /dev/shm, node selector) and
`trainlib launch` (NeuronCores per device, how many EFA interfaces the pod should see, whether
the GPUs have GPUDirect RDMA over EFA). Values are per instance, from these sources:

- p4d/p5/p5e/p5en, g5, m5/c5: AWS's instance-type pages (aws.amazon.com/ec2/instance-types/p4,
  /p5, /g5, /m5, /c5), as transcribed in meta-pytorch/torchx `torchx/specs/named_resources_aws.py`
  (vCPUs, host GiB, GPUs, `vpc.amazonaws.com/efa` count); p5en = 16 EFA (EFAv3), p5/p5e = 32.
- trn1/trn1n: Neuron docs "Trn1/Trn1n Architecture" (16 Trainium devices, 128 vCPUs, 512 GiB;
  trn1.2xlarge 1 device, 8 vCPUs, 32 GiB) and "How to prepare trn1.32xlarge for multi-node
  execution" (trn1.32xlarge 8 EFA devices, trn1n.32xlarge 16; no EFA on smaller sizes).
- trn2: Neuron docs "Best practices for training" / "Logical NeuronCore configuration" (16
  Trainium2 chips x 8 physical NeuronCores; the default LNC=2 shows 4 logical cores per chip, 64
  ranks per instance). 192 vCPUs, 2 TiB and 16 EFA interfaces are from AWS's trn2 page (not
  re-checked in the session that wrote this table).
- g6: AWS's g6 page (L4 GPUs; EFA on 8xlarge and larger), not re-checked in that session.

`hugepages_2mi` is what an EFA pod requests (libfabric registers buffers in 2 MiB huge pages);
5120Mi is the request used by the aws-efa-k8s-device-plugin examples. The node must have them
preallocated (the EKS GPU/Neuron AMIs do for EFA instances).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

INSTANCE_ENV = "TRAINLIB_INSTANCE_TYPE"   # set in the pod by `trainlib k8s --instance-type`
EFA_HUGEPAGES = "5120Mi"
# Of the host's memory, the pod requests this share: the kubelet's reservation (EKS AMI: 255 MiB +
# 11 MiB per pod, plus 100 MiB eviction threshold), the node daemonsets (aws-node, kube-proxy, the
# device plugins) and the kernel's own reservation (MemTotal < nominal GiB) must fit in the rest.
MEMORY_SHARE = 0.90
CPU_SHARE = 0.90
# /dev/shm (a memory-backed emptyDir) is charged to the pod's memory: this share of the pod's
# memory goes to it, the rest stays for the ranks' own RSS (dataloader workers use /dev/shm).
SHM_SHARE = 0.25


@dataclass(frozen=True)
class InstanceType:
    name: str
    vcpus: int
    memory_gib: int
    gpus: int = 0
    neuron_devices: int = 0
    neuron_cores_per_device: int = 0     # logical NeuronCores at the default LNC (trn2: LNC=2 -> 4)
    neuron_physical_cores_per_device: int = 0   # trn1: 2 (NeuronCore-v2), trn2: 8 (NeuronCore-v3)
    efa: int = 0                         # EFA interfaces (vpc.amazonaws.com/efa)
    gpudirect_rdma: bool = False         # GPU memory registered with EFA directly (p4d and later)

    @property
    def neuron_cores(self) -> int:
        return self.neuron_devices * self.neuron_cores_per_device

    @property
    def accelerator(self) -> str:
        return "neuron" if self.neuron_devices else "gpu" if self.gpus else "cpu"

    @property
    def hugepages_2mi(self) -> str | None:
        return EFA_HUGEPAGES if self.efa else None

    def pod_memory_gi(self) -> int:
        return max(1, int(self.memory_gib * MEMORY_SHARE))

    def pod_cpu(self) -> int:
        return max(1, int(self.vcpus * CPU_SHARE))

    def shm_gi(self) -> int:
        return max(1, int(self.pod_memory_gi() * SHM_SHARE))


def _gpu(name: str, vcpus: int, mem: int, gpus: int, efa: int = 0, rdma: bool = False) -> InstanceType:
    return InstanceType(name, vcpus, mem, gpus=gpus, efa=efa, gpudirect_rdma=rdma)


def _trn(name: str, vcpus: int, mem: int, devices: int, physical: int, lnc: int, efa: int = 0) -> InstanceType:
    return InstanceType(name, vcpus, mem, neuron_devices=devices, neuron_cores_per_device=physical // lnc,
                        neuron_physical_cores_per_device=physical, efa=efa)


TABLE: dict[str, InstanceType] = {t.name: t for t in (
    _gpu("p4d.24xlarge", 96, 1152, 8, efa=4, rdma=True),
    _gpu("p4de.24xlarge", 96, 1152, 8, efa=4, rdma=True),
    _gpu("p5.48xlarge", 192, 2048, 8, efa=32, rdma=True),
    _gpu("p5e.48xlarge", 192, 2048, 8, efa=32, rdma=True),
    _gpu("p5en.48xlarge", 192, 2048, 8, efa=16, rdma=True),
    _gpu("g5.xlarge", 4, 16, 1),
    _gpu("g5.2xlarge", 8, 32, 1),
    _gpu("g5.8xlarge", 32, 128, 1, efa=1),
    _gpu("g5.12xlarge", 48, 192, 4, efa=1),
    _gpu("g5.24xlarge", 96, 384, 4, efa=1),
    _gpu("g5.48xlarge", 192, 768, 8, efa=1),
    _gpu("g6.xlarge", 4, 16, 1),
    _gpu("g6.12xlarge", 48, 192, 4, efa=1),
    _gpu("g6.48xlarge", 192, 768, 8, efa=1),
    _trn("trn1.2xlarge", 8, 32, 1, 2, lnc=1),
    _trn("trn1.32xlarge", 128, 512, 16, 2, lnc=1, efa=8),
    _trn("trn1n.32xlarge", 128, 512, 16, 2, lnc=1, efa=16),
    _trn("trn2.48xlarge", 192, 2048, 16, 8, lnc=2, efa=16),
    InstanceType("m5.xlarge", 4, 16),
    InstanceType("m5.2xlarge", 8, 32),
    InstanceType("m5.24xlarge", 96, 384),
    InstanceType("c5.18xlarge", 72, 144),
)}
MAX_NEURON_DEVICES = max(t.neuron_devices for t in TABLE.values())


def lookup(name: str) -> InstanceType:
    """The table entry for `name`; a ValueError that lists the known types otherwise."""
    try:
        return TABLE[name]
    except KeyError:
        raise ValueError(f"unknown instance type {name!r}; known: {', '.join(sorted(TABLE))} "
                         "(or leave --instance-type out and give --gpus-per-node/--efa/--memory yourself)") from None


def from_env(env: dict[str, str] | None = None) -> InstanceType | None:
    """The instance this pod runs on, when the manifest said so (TRAINLIB_INSTANCE_TYPE); None if unknown."""
    name = (os.environ if env is None else env).get(INSTANCE_ENV, "")
    return TABLE.get(name) if name else None
