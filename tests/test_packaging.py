"""What `pip install` puts on the path: trainlib with its kernels, launchers and benchmarks as
subpackages, a `trainlib` console script, and no bare top-level `kernels` / `launchers` package
(PyPI has a popular `kernels`; ours must not shadow it or be shadowed by it).

Run from a temporary directory, so the repository root (pytest's rootdir) is not on sys.path and
only what the installation provides can be imported."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _py(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_subpackages_import_and_bare_names_do_not(tmp_path):
    out = _py("import json, trainlib, trainlib.kernels, trainlib.launchers, trainlib.benchmarks\n"
              "print(json.dumps({m.__name__: m.__file__ for m in (trainlib.kernels, trainlib.launchers)}))", tmp_path)
    assert out.returncode == 0, out.stderr
    files = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(files["trainlib.kernels"]).resolve().parent == (ROOT / "kernels").resolve() or \
        "site-packages" in files["trainlib.kernels"]
    for bare in ("kernels", "launchers", "benchmarks"):
        out = _py(f"import {bare}", tmp_path)
        assert out.returncode != 0 and f"No module named '{bare}'" in out.stderr, (bare, out.stdout, out.stderr)


def test_distribution_declares_only_trainlib_and_the_console_script():
    dist = metadata.distribution("trainlib")
    scripts = [e for e in dist.entry_points if e.group == "console_scripts"]
    assert [e.name for e in scripts] == ["trainlib"]
    assert scripts[0].value.startswith("trainlib.")
    extras = set(dist.metadata.get_all("Provides-Extra") or [])
    assert {"test", "mpi", "ray", "deepspeed", "gpu", "bench"} <= extras, extras
    requires = " ".join(dist.requires or [])
    assert "torch" in requires and "mpi4py" in requires and "mpich" in requires


def test_console_script_is_installed_and_runs(tmp_path):
    exe = shutil.which("trainlib", path=str(Path(sys.executable).parent))
    assert exe, "the trainlib console script is not next to this interpreter"
    out = subprocess.run([exe, "train", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--train.steps", "--train.batch_size", "--train.seed", "--mesh.dp", "--mesh.tp", "--mesh.pp",
                 "--sync.kind", "--model.d_model", "--nproc-per-node"):
        assert flag in out.stdout, flag


def test_wheel_carries_the_data_files_the_library_reads(tmp_path):
    """A non-editable install gets only what package_data names: the kernels' C++ source and the
    planner's shipped profiles must be in the wheel (an editable install would hide their absence)."""
    import zipfile

    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                          str(tmp_path), str(ROOT)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    shutil.rmtree(ROOT / "build", ignore_errors=True)  # setuptools' scratch copy
    (wheel,) = tmp_path.glob("trainlib-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f"trainlib/planner/profiles/{p.name}" for p in (ROOT / "trainlib/planner/profiles").glob("*.json")}
    want |= {f"trainlib/kernels/csrc/{p.name}" for p in (ROOT / "kernels/csrc").glob("*.cpp")}
    assert len(want) >= 6 and want <= names, sorted(want - names)
