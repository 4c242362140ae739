"""`trainlib env` reports the values a pod really has, read off a fake /sys and /dev tree.

References: the fake tree's known contents (two EFA uverbs nodes, a plugin carrying its version
string, a dpkg status file), `df` for the size of the filesystem behind /dev/shm, and the shell's
own `ulimit -l` after the test lowers the soft limit.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess

import pytest

from trainlib.launchers import envinfo
from trainlib.launchers.devices import ofi_plugin_version, probe

from tests.test_launch_plan import _efa_tree

STRIP = ("PET_", "OMPI_", "PMI_", "NEURON_", "TRAINLIB_", "CUDA_VISIBLE_DEVICES")


@pytest.fixture
def clean_env(monkeypatch):
    for k in [k for k in os.environ if k.startswith(STRIP) or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")]:
        monkeypatch.delenv(k)
    return monkeypatch


@pytest.fixture
def low_memlock():
    """Lower the soft RLIMIT_MEMLOCK to 64 KiB for the test (a soft limit may go back up to the hard one)."""
    old = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    want = 64 * 1024 if old[1] == resource.RLIM_INFINITY else min(64 * 1024, old[1])
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (want, old[1]))
    yield want
    resource.setrlimit(resource.RLIMIT_MEMLOCK, old)


def _pod_tree(tmp_path):
    root = _efa_tree(tmp_path, plugin="libnccl-net-ofi.so")
    plugin = root / "opt" / "amazon" / "ofi-nccl" / "lib" / "libnccl-net-ofi.so"
    plugin.write_bytes(b"\x7fELF" + b"\0" * 4096 + b"NET/OFI Initializing aws-ofi-nccl 1.22.0\0" + b"\0" * 128)
    (root / "dev" / "shm").mkdir()
    return root, plugin


def test_env_reports_efa_plugin_version_shm_and_memlock(tmp_path, clean_env, low_memlock, capsys):
    root, plugin = _pod_tree(tmp_path)
    assert envinfo.main(["--json"], root=str(root)) == 0
    pod = json.loads(capsys.readouterr().out)["pod"]
    assert pod["efa_devices"] == ["rdmap16s27", "rdmap32s27"]          # the two uverbs nodes of the fake pod
    assert pod["ofi_plugin"] == str(plugin) and pod["ofi_plugin_version"] == "1.22.0"
    df = subprocess.run(["df", "-B1", "--output=size", str(root / "dev" / "shm")], capture_output=True, text=True,
                        check=True).stdout.split()
    assert pod["dev_shm_bytes"] == int(df[-1])                           # what df says of the same mount
    shell = subprocess.run(["sh", "-c", "ulimit -l"], capture_output=True, text=True, check=True).stdout.strip()
    assert pod["ulimit_l_kib"] == int(shell) == low_memlock // 1024       # what the shell says
    assert envinfo.main([], root=str(root)) == 0
    text = capsys.readouterr().out
    assert "pod: EFA devices: 2 (rdmap16s27, rdmap32s27)" in text
    assert f"pod: aws-ofi-nccl: {plugin} (version 1.22.0)" in text
    assert f"pod: ulimit -l: {shell} KiB — EFA needs unlimited locked memory" in text


def test_dpkg_record_wins_over_the_library_string(tmp_path):
    root, plugin = _pod_tree(tmp_path)
    status = root / "var" / "lib" / "dpkg"
    status.mkdir(parents=True)
    (status / "status").write_text("Package: libfabric-aws\nVersion: 2.7.0amzn2.0\n\n"
                                   "Package: libnccl-ofi\nStatus: install ok installed\nVersion: 1.21.1-1\n")
    assert ofi_plugin_version(str(plugin), str(root)) == "1.21.1"
    (status / "status").unlink()
    assert ofi_plugin_version(str(plugin), str(root)) == "1.22.0"
    plugin.write_bytes(b"\x7fELF no version here")
    assert ofi_plugin_version(str(plugin), str(root)) is None


def test_neuron_visible_cores_and_nccl_version(tmp_path, clean_env, monkeypatch, capsys):
    root = tmp_path
    (root / "dev").mkdir()
    for i in range(16):
        (root / "dev" / f"neuron{i}").touch()
    monkeypatch.setenv("TRAINLIB_INSTANCE_TYPE", "trn2.48xlarge")
    dev = probe(root=str(root), with_nccl=False)
    assert (dev.neuron_cores, dev.neuron_core_ids) == (64, "0-63")     # 16 Trainium2 devices x 4 (LNC=2)
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "8-15")
    assert envinfo.main([], root=str(root)) == 0
    text = capsys.readouterr().out
    assert "pod: Neuron visible cores: 8-15 (8 cores)" in text
    assert "pod: /dev/shm: not mounted" in text and "pod: EFA devices: 0 (none" in text
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: (2, 27, 3))
    assert probe(root=str(root), with_nccl=True).nccl_version == "2.27.3"
