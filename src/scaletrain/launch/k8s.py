"""``scaletrain launch k8s``: a JobSet manifest with one pod per node, each
running one torchrun that rendezvouses (c10d) on pod 0.

Why JobSet (kubernetes-sigs/jobset) and not Kubeflow's PyTorchJob: JobSet is
the Kubernetes project's own API for groups of Jobs that live and die
together (Kubeflow Trainer v2 is built on it; the training-operator v1 that
serves PyTorchJob is in maintenance). It is framework-neutral, so the pods run
the same torchrun command as the Slurm launcher instead of an operator's
injected MASTER_ADDR/PET_* variables; it gives every pod a stable DNS name
through a headless service; its ``failurePolicy.maxRestarts`` recreates the
whole group after a failure, which is what a c10d rendezvous needs; and its
pod template is a plain ``batch/v1`` Job, checkable with the Kubernetes
client's own models.

Documents: a headless Service (pod DNS names for the rendezvous), a
ConfigMap with the resolved config, a ReadWriteMany PersistentVolumeClaim
for the run directory (checkpoints survive restarts: every restart resumes
from the newest one), and the JobSet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from scaletrain.errors import UserError
from scaletrain.launch.common import Job, check_job, train_args, worker_env

API_VERSION = "jobset.x-k8s.io/v1alpha2"
NAME = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")  # DNS-1035, short enough for pod hostnames
RDZV_PORT = 29500
CONFIG_DIR, RUN_ROOT = "/etc/scaletrain", "/runs"
REPLICATED_JOB = "node"


@dataclass
class K8sSpec:
    config: Path
    overrides: list[str]
    nodes: int | None
    gpus_per_node: int
    image: str
    nproc_per_node: int | None = None
    name: str | None = None
    namespace: str = "default"
    storage: str = "100Gi"
    storage_class: str | None = None
    claim: str | None = None
    cpu: str = "8"
    memory: str = "64Gi"
    max_restarts: int = 3
    env: list[str] | None = None
    placement: Path | None = None
    grace_s: int = 300


def render(spec: K8sSpec) -> str:
    """The manifest: YAML documents separated by ``---``."""
    job = check_job(spec.config, spec.overrides, spec.nodes, spec.gpus_per_node, spec.nproc_per_node,
                    spec.env or [], spec.max_restarts, spec.placement)
    name = spec.name or f"scaletrain-{spec.config.stem.lower().replace('_', '-')}"
    if not NAME.match(name):
        raise UserError(f"--name {name!r}: use lowercase letters, digits and '-', starting with a letter, "
                        "at most 40 characters (it becomes part of every pod's DNS name)")
    if spec.grace_s < 0:
        raise UserError(f"--grace = {spec.grace_s}; allowed: 0 or more seconds")
    if job.hosts and len({len(g) for _, g in job.hosts}) > 1:
        raise UserError("--placement gives the hosts different GPU counts; a JobSet pod template asks every "
                        "node for the same number")
    claim = spec.claim or f"{name}-runs"
    docs = [_service(name, spec.namespace), _config_map(name, spec.namespace, job),
            *([] if spec.claim else [_claim(claim, spec)]), _jobset(name, claim, spec, job)]
    return yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False)


def _meta(name: str, namespace: str) -> dict:
    return {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/name": "scaletrain",
                                                              "app.kubernetes.io/instance": name}}


def _service(name: str, namespace: str) -> dict:
    # JobSet creates this itself when missing; written out so the rendezvous
    # port is named and unready pods resolve (they rendezvous before ready).
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, namespace),
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": {"jobset.sigs.k8s.io/jobset-name": name},
                     "ports": [{"name": "rendezvous", "port": RDZV_PORT, "targetPort": RDZV_PORT}]}}


def _config_map(name: str, namespace: str, job: Job) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(f"{name}-config", namespace),
            "data": {"config.toml": job.cfg.to_toml()}}


def _claim(claim: str, spec: K8sSpec) -> dict:
    body = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": spec.storage}}}
    if spec.storage_class:
        body["storageClassName"] = spec.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _meta(claim, spec.namespace),
            "spec": body}


def _resources(spec: K8sSpec, job: Job) -> dict:
    requests = {"cpu": spec.cpu, "memory": spec.memory}
    limits = {"memory": spec.memory}
    if job.gpus_per_node:
        # Extended resources are whole devices: the limit is the request.
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(job.gpus_per_node)
    return {"requests": requests, "limits": limits}


def _command(name: str, job: Job) -> list[str]:
    head = f"{name}-{REPLICATED_JOB}-0-0.{name}"  # JobSet pod hostname <jobset>-<rjob>-<job>-<pod>.<subdomain>
    return ["python3", "-m", "torch.distributed.run", f"--nnodes={job.nodes}",
            f"--nproc-per-node={job.nproc_per_node}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={head}:{RDZV_PORT}", "--rdzv-id=$(RDZV_ID)",
            # JobSet restarts the whole group (failurePolicy); torchrun does not restart on its own.
            "--max-restarts=0",
            *train_args(Path(CONFIG_DIR) / "config.toml", [], f"{RUN_ROOT}/{name}")]


def _affinity(name: str, job: Job) -> dict:
    one_per_node = {"labelSelector": {"matchLabels": {"jobset.sigs.k8s.io/jobset-name": name}},
                    "topologyKey": "kubernetes.io/hostname"}
    affinity: dict = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [one_per_node]}}
    if job.hosts:
        hosts = [h for h, _ in job.hosts]
        term = {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": hosts}]}
        affinity["nodeAffinity"] = {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}
    return affinity


def _pod(name: str, claim: str, spec: K8sSpec, job: Job) -> dict:
    restart_attempt = "metadata.labels['jobset.sigs.k8s.io/restart-attempt']"
    env = [{"name": "JOBSET_RESTART_ATTEMPT", "valueFrom": {"fieldRef": {"fieldPath": restart_attempt}}},
           {"name": "RDZV_ID", "value": f"{name}-$(JOBSET_RESTART_ATTEMPT)"},  # unique per restart
           {"name": "OMP_NUM_THREADS", "value": str(max(1, _cores(spec.cpu) // job.nproc_per_node))},
           *({"name": k, "value": v} for k, v in worker_env(job).items())]
    container = {"name": "trainer", "image": spec.image, "command": _command(name, job), "env": env,
                 "ports": [{"name": "rendezvous", "containerPort": RDZV_PORT}],
                 "resources": _resources(spec, job),
                 "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                                  {"name": "runs", "mountPath": RUN_ROOT},
                                  {"name": "dshm", "mountPath": "/dev/shm"}]}
    return {"spec": {
        "restartPolicy": "Never",
        # SIGTERM (preemption, deletion) -> torchrun -> workers checkpoint and exit 0: give them the time.
        "terminationGracePeriodSeconds": spec.grace_s,
        "affinity": _affinity(name, job),
        "containers": [container],
        "volumes": [{"name": "config", "configMap": {"name": f"{name}-config"}},
                    {"name": "runs", "persistentVolumeClaim": {"claimName": claim}},
                    # NCCL and DataLoader workers use shared memory; a container's default is 64 MiB.
                    {"name": "dshm", "emptyDir": {"medium": "Memory"}}]}}


def _cores(cpu: str) -> int:
    """Whole cores in a Kubernetes CPU quantity ("8", "500m")."""
    try:
        return int(float(cpu[:-1]) / 1000) if cpu.endswith("m") else int(float(cpu))
    except ValueError:
        raise UserError(f"--cpu {cpu!r}: expected a Kubernetes CPU quantity such as 8 or 7500m") from None


def _jobset(name: str, claim: str, spec: K8sSpec, job: Job) -> dict:
    job_template = {"spec": {"parallelism": job.nodes, "completions": job.nodes, "completionMode": "Indexed",
                             "backoffLimit": 0, "template": _pod(name, claim, spec, job)}}
    return {"apiVersion": API_VERSION, "kind": "JobSet", "metadata": _meta(name, spec.namespace),
            "spec": {"failurePolicy": {"maxRestarts": spec.max_restarts},
                     "network": {"enableDNSHostnames": True, "subdomain": name, "publishNotReadyAddresses": True},
                     "replicatedJobs": [{"name": REPLICATED_JOB, "replicas": 1, "template": job_template}]}}
