"""Dedicated parameter servers for a job: a StatefulSet, its headless Service, the token Secret.

Servers get stable DNS names `<job>-ps-<i>.<job>-ps` from the headless Service (clusterIP None,
publishNotReadyAddresses so workers can resolve them while they start), bind all interfaces of
their pod (`trainlib ps-server --bind 0.0.0.0:PORT`: a pod's loopback is unreachable from other
pods), and authenticate every message with the shared token, mounted from the Secret as a file.
Workers receive TRAINLIB_PS_ADDRS (comma-separated host:port) and TRAINLIB_PS_TOKEN_FILE.
"""
from __future__ import annotations

import secrets

from trainlib.launchers.manifests import JobSpec, prometheus_annotations

TOKEN_DIR = "/var/run/trainlib-ps"


def secret_name(spec: JobSpec) -> str:
    return spec.ps_token_secret or f"{spec.name}-ps-token"


def worker_env(spec: JobSpec) -> list[dict]:
    addrs = ",".join(f"{spec.name}-ps-{i}.{spec.name}-ps:{spec.ps_port}" for i in range(spec.ps_servers))
    return [{"name": "TRAINLIB_PS_ADDRS", "value": addrs},
            {"name": "TRAINLIB_PS_TOKEN_FILE", "value": f"{TOKEN_DIR}/token"}]


# The images run as uid/gid 1000 (Dockerfile.gpu); Secret files belong to root, so pods that mount
# the token set fsGroup and the file is readable by owner and group only.
TOKEN_FS_GROUP = 1000


def token_volume(spec: JobSpec) -> tuple[dict, dict]:
    """(volume, volumeMount) for the token Secret: read-only, mode 0440 (owner and fsGroup)."""
    return ({"name": "ps-token", "secret": {"secretName": secret_name(spec), "defaultMode": 0o440}},
            {"name": "ps-token", "mountPath": TOKEN_DIR, "readOnly": True})


def with_ps_sync(cmd: list[str]) -> list[str]:
    """`trainlib train` uses the servers only with --sync.kind=ps; add it unless the command chose a kind."""
    if cmd[:2] == ["trainlib", "train"] and not any(a.startswith("--sync.kind") for a in cmd):
        return [*cmd, "--sync.kind=ps"]
    return cmd


def ps_objects(spec: JobSpec) -> list[dict]:
    if spec.ps_servers < 1:
        return []
    name, port = f"{spec.name}-ps", spec.ps_port
    md = {"namespace": spec.namespace} if spec.namespace else {}
    labels = {"app.kubernetes.io/name": "trainlib-ps", "trainlib/job": spec.name}
    volume, mount = token_volume(spec)
    objs: list[dict] = []
    if spec.ps_token_secret is None:
        objs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": secret_name(spec), **md},
                     "type": "Opaque", "stringData": {"token": secrets.token_hex(32)}})
    objs.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels, **md},
                 "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": labels,
                          "ports": [{"name": "ps", "port": port, "targetPort": port, "protocol": "TCP"}]}})
    command = ["trainlib", "ps-server", "--bind", f"0.0.0.0:{port}"]
    ports = [{"name": "ps", "containerPort": port, "protocol": "TCP"}]
    template_md: dict = {"labels": labels}
    if spec.prometheus_port is not None:  # requests, drops by reason, bytes, latency (ps-server --metrics)
        command += ["--metrics", f"0.0.0.0:{spec.prometheus_port}"]
        ports.append({"name": "metrics", "containerPort": spec.prometheus_port, "protocol": "TCP"})
        template_md["annotations"] = prometheus_annotations(spec)
    server = {"name": "ps", "image": spec.image, "imagePullPolicy": "IfNotPresent",
              "command": command, "ports": ports,
              "env": [{"name": "TRAINLIB_PS_TOKEN_FILE", "value": f"{TOKEN_DIR}/token"}],
              "volumeMounts": [mount],
              "resources": {"requests": {"cpu": spec.cpu or "4", "memory": spec.memory or "16Gi"}}}
    objs.append({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": name, "labels": labels, **md},
                 "spec": {"serviceName": name, "replicas": spec.ps_servers, "podManagementPolicy": "Parallel",
                          "selector": {"matchLabels": labels},
                          "template": {"metadata": template_md,
                                       "spec": {"securityContext": {"fsGroup": TOKEN_FS_GROUP},
                                                "containers": [server], "volumes": [volume]}}}})
    return objs
