"""`trainlib plan`: pick dp x tp x pp, the ZeRO stage, the pipeline schedule, activation
checkpointing and the gradient-sync backend from a calibrated cost model.

    spec.py      the model's shapes and the cluster
    layouts.py   every valid layout (and its `trainlib train` flags)
    memory.py    peak bytes per device
    timing.py    step seconds per layout (compute, exposed communication per axis, bubble, sync)
    profile.py   the machine's measured (or published) inputs, as a small JSON file
    calibrate.py measures a profile on this machine
    rank.py      predict, rank, explain why each loses to the one above
    emit.py      the winner as a `trainlib train` command or a Kubernetes manifest
"""
