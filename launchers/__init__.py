"""Launchers: how a trainlib job starts on a laptop, in a Kubernetes pod, under mpiexec or on Ray.

Installed as `trainlib.launchers` (never import a bare `launchers`). One concept per module:

    errors.py        exit codes that fit Kubeflow's ExitCode restart policy (1 permanent, 138 retry)
    detect.py        where this process runs: PyTorchJob, TrainJob, MPIJob, torchrun child, plain
    devices.py       what the node has: GPUs, Neuron cores, EFA devices, the NCCL OFI plugin
    instances.py     EC2 instance facts (accelerators, EFA, memory) that size pods and profiles
    profiles.py      environment profiles (EFA/NCCL, Neuron, CPU/gloo) chosen from the devices
    torchrun_args.py the torchrun command line for a placement (pure)
    plan.py          detection + devices + profile + arguments -> one LaunchPlan, explained
    launch.py        `trainlib launch`: run the plan (torchrun's elastic agent, mpirun, or exec)
    mpi.py           mpiexec ranks -> torch.distributed env; MPIJob launcher -> mpirun command
    envinfo.py       `trainlib env`: print the plan without running anything
    manifests.py     PyTorchJob / MPIJob objects; gang.py PodGroups and queues; ps.py servers
    rayjob.py        KubeRay RayJob / RayCluster objects; trainjob.py Trainer v2 TrainJob + runtime
    webhooks.py      the operators' admission rules, re-implemented as checks (admission.py: KubeRay, Trainer v2)
    k8s.py           `trainlib k8s`: print manifests as YAML
    ray.py           N Ray workers in one placement group running a torch.distributed function
    tune.py          hyper-parameter search with Ray Tune over trainlib runs
    entrypoint.sh    the container entrypoint (`exec trainlib launch "$@"`)
"""
