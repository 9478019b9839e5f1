"""``scaletrain launch {slurm,k8s}`` and ``scaletrain allocate``: parse, call, print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from scaletrain.errors import UserError

launch_app = typer.Typer(no_args_is_help=True, help="Write (and submit) cluster jobs: Slurm, Kubernetes.")

ConfigOpt = typer.Option(..., "--config", "-c", help="scaletrain TOML config the job trains.")
SetOpt = typer.Option([], "--set", "-s", help="Override one key: section.key=value (repeatable).")
NodesOpt = typer.Option(None, "--nodes", "-N", help="Nodes (default 1, or the --placement's host count).")
GpusOpt = typer.Option(..., "--gpus-per-node", "-G", help="GPUs per node; 0 = CPU workers (gloo).")
NprocOpt = typer.Option(None, "--nproc-per-node", help="Workers per node (default --gpus-per-node; with 0 "
                        "GPUs, 1).")
PlacementOpt = typer.Option(None, "--placement", help="A job's placement JSON from `scaletrain allocate --out`: "
                            "pins the nodes (and on Slurm each node's GPUs).")
RestartsOpt = typer.Option(3, "--max-restarts", help="Restarts after a failure (each resumes from the newest "
                           "checkpoint).")


@launch_app.command("slurm")
def slurm(
    config: Path = ConfigOpt,
    set_: List[str] = SetOpt,
    nodes: Optional[int] = NodesOpt,
    gpus_per_node: int = GpusOpt,
    nproc_per_node: Optional[int] = NprocOpt,
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run directory on a filesystem every node "
                                           "sees (default runs/<config name>); resubmitting resumes."),
    job_dir: Optional[Path] = typer.Option(None, "--job-dir", help="Where the script and the per-node logs go "
                                           "(default RUN_DIR-slurm, beside the run directory)."),
    partition: Optional[str] = typer.Option(None, "--partition", "-p", help="Slurm partition."),
    time_limit: Optional[str] = typer.Option(None, "--time", "-t", help="Slurm time limit (e.g. 4:00:00)."),
    account: Optional[str] = typer.Option(None, "--account", "-A", help="Slurm account."),
    cpus_per_node: Optional[int] = typer.Option(None, "--cpus-per-node", help="CPUs to ask for per node."),
    port: int = typer.Option(0, "--port", help="Rendezvous port on the head node (0 = 20000 + job id % 20000)."),
    grace_s: int = typer.Option(300, "--grace", help="Seconds before the time limit at which the job "
                                "checkpoints and requeues itself."),
    max_restarts: int = RestartsOpt,
    env: List[str] = typer.Option([], "--env", help="Extra KEY=VALUE for the workers (repeatable)."),
    placement: Optional[Path] = PlacementOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write the script "
                                       "(default JOB_DIR/slurm.sbatch)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the script; write and submit nothing."),
    submit: bool = typer.Option(False, "--submit", help="Submit it with sbatch."),
) -> None:
    """Write an sbatch script that runs one torchrun per node (c10d rendezvous on the head node)."""
    from scaletrain.launch import slurm as slurm_mod

    spec = slurm_mod.SlurmSpec(config=config, overrides=list(set_), nodes=nodes, gpus_per_node=gpus_per_node,
                               nproc_per_node=nproc_per_node, run_dir=run_dir, job_dir=job_dir,
                               partition=partition,
                               time_limit=time_limit, account=account, cpus_per_node=cpus_per_node, port=port,
                               grace_s=grace_s, max_restarts=max_restarts, env=list(env), placement=placement)
    script, job_dir = slurm_mod.render(spec)
    if dry_run:
        if submit:
            raise UserError("--dry-run and --submit exclude each other")
        print(script, end="")
        return
    if submit:
        slurm_mod.require_sbatch()  # before anything is written
    path = out or job_dir / "slurm.sbatch"
    (job_dir / "logs").mkdir(parents=True, exist_ok=True)  # Slurm opens --output before the script runs
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    print(f"wrote {path}")
    if submit:
        print(f"submitted batch job {slurm_mod.submit(path)}")
    else:
        print(f"submit it with: sbatch {path}")


@launch_app.command("k8s")
def k8s(
    config: Path = ConfigOpt,
    set_: List[str] = SetOpt,
    nodes: Optional[int] = NodesOpt,
    gpus_per_node: int = GpusOpt,
    nproc_per_node: Optional[int] = NprocOpt,
    image: str = typer.Option(..., "--image", help="Container image with scaletrain installed."),
    name: Optional[str] = typer.Option(None, "--name", help="Job name (default scaletrain-<config name>)."),
    namespace: str = typer.Option("default", "--namespace", help="Kubernetes namespace."),
    storage: str = typer.Option("100Gi", "--storage", help="Size of the shared checkpoint volume."),
    storage_class: Optional[str] = typer.Option(None, "--storage-class", help="StorageClass of the shared "
                                                "volume (must support ReadWriteMany)."),
    claim: Optional[str] = typer.Option(None, "--claim", help="Use this existing PersistentVolumeClaim "
                                        "instead of creating one."),
    cpu: str = typer.Option("8", "--cpu", help="CPU request per pod."),
    memory: str = typer.Option("64Gi", "--memory", help="Memory request per pod."),
    max_restarts: int = RestartsOpt,
    grace_s: int = typer.Option(300, "--grace", help="Seconds a pod may take to checkpoint after SIGTERM."),
    env: List[str] = typer.Option([], "--env", help="Extra KEY=VALUE for the workers (repeatable)."),
    placement: Optional[Path] = PlacementOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the manifest here instead of stdout."),
) -> None:
    """Write a JobSet manifest: headless service, config ConfigMap, shared checkpoint volume."""
    from scaletrain.launch import k8s as k8s_mod

    spec = k8s_mod.K8sSpec(config=config, overrides=list(set_), nodes=nodes, gpus_per_node=gpus_per_node,
                           nproc_per_node=nproc_per_node, image=image, name=name, namespace=namespace,
                           storage=storage, storage_class=storage_class, claim=claim, cpu=cpu, memory=memory,
                           max_restarts=max_restarts, env=list(env), placement=placement, grace_s=grace_s)
    manifest = k8s_mod.render(spec)
    if out is None:
        print(manifest, end="")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(manifest)
    print(f"wrote {out}; apply it with: kubectl apply -f {out}  (needs the JobSet controller)")


def allocate(
    inventory: Path = typer.Option(..., "--inventory", help="Cluster TOML: [[node]] name, gpus, rack, count."),
    jobs: Path = typer.Option(..., "--jobs", help="Jobs TOML: [[job]] name, gpus or tp/pp/dp."),
    policy: str = typer.Option("best_fit", "--policy", help="first_fit, best_fit, load_balance or topology."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write <job>.json (hosts, GPUs, "
                                       "CUDA_VISIBLE_DEVICES per host) and <job>.hostfile here."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Place jobs' ranks on nodes and GPUs: TP groups inside a node, pipeline stages in node order."""
    from scaletrain.launch.allocator import allocate as run, hostfile, load_inventory, load_jobs

    cluster, placed, queued = run(load_inventory(inventory), load_jobs(jobs), policy)
    report = {"policy": policy, "placements": [p.as_dict() for p in placed], "queued": queued,
              "utilisation": {n.name: n.used / n.gpus for n in cluster.nodes},
              "gpus_used": cluster.total - cluster.free, "gpus_total": cluster.total,
              "fragmentation": cluster.fragmentation()}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for p in placed:
            (out / f"{p.job.name}.json").write_text(json.dumps(p.as_dict(), indent=1))
            (out / f"{p.job.name}.hostfile").write_text(hostfile(p))
    if as_json:
        print(json.dumps(report, indent=1))
        return
    _print_allocation(report)


def _print_allocation(report: dict) -> None:
    print(f"policy {report['policy']}: {len(report['placements'])} placed, {len(report['queued'])} queued")
    for p in report["placements"]:
        where = "  ".join(f"{h}:{p['cuda_visible_devices'][h]}" for h in p["hosts"])
        print(f"  {p['job']} ({p['world_size']} GPU{'s' if p['world_size'] != 1 else ''}, tp {p['tp']} pp {p['pp']} dp {p['dp']}): {where}")
    for job, reason in report["queued"].items():
        print(f"  {job} queued: {reason}")
    print("utilisation per node:")
    for node, share in report["utilisation"].items():
        print(f"  {node} {share:6.1%}")
    print(f"cluster {report['gpus_used']}/{report['gpus_total']} GPUs used "
          f"({report['gpus_used'] / report['gpus_total']:.1%}); fragmentation {report['fragmentation']:.1%} "
          "(free GPUs on partly used nodes / all free GPUs)")
