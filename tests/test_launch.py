"""`scaletrain launch slurm` and `launch k8s` without a cluster: the sbatch
script run by bash against stand-in scontrol/srun, and the JobSet manifest
checked with the Kubernetes client's own models (and kubectl where a server
answers). The real Slurm run is in test_slurm.py."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import yaml
from harness import REPO, run_cli

from scaletrain.cli import main
from scaletrain.config import load_config


def cli(args, timeout=None):
    """``scaletrain ARGS`` in this process (the launchers only write files): exit code, stdout, stderr.
    Called like harness.run_cli (``timeout`` is unused: nothing here waits)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())

BATCH = ["--set", "training.global_batch_size=16", "--set", "training.micro_batch_size=4"]


def slurm_script(tmp_path, *args, run=cli):
    proc = run(["launch", "slurm", "--config", str(REPO / "configs" / "debug.toml"), "--run-dir",
                    str(tmp_path / "run"), "--dry-run", *args], timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def fake_tools(bin_dir, hostnames: str, srun_exit: int, summary: str | None):
    """scontrol printing ``hostnames``; srun recording its argv, optionally
    writing a summary.json (as workers stopped by SIGTERM do), exiting ``srun_exit``."""
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/bash\n[ \"$1 $2\" = 'show hostnames' ] && printf '{hostnames}'\n")
    write = f"printf '%s' '{summary}' > \"$RUN_DIR/summary.json\"\n" if summary else ""
    (bin_dir / "srun").write_text(f"#!/bin/bash\nprintf '%s\\n' \"$@\" > \"$RUN_DIR/srun.args\"\n{write}"
                                  f"exit {srun_exit}\n")
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)


def script_command(tmp_path, script, nodes=1, job_id="4242"):
    """bash running the script with PATH = the stand-ins plus the few tools it uses (no real Slurm)."""
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    (tmp_path / "run").mkdir(exist_ok=True)
    tools = tmp_path / "tools"
    if not tools.exists():
        tools.mkdir()
        for tool in ("mkdir", "head", "awk", "getent", "date", "cat", "touch", "sleep"):
            (tools / tool).symlink_to(shutil.which(tool))
    env = {"PATH": f"{tmp_path / 'bin'}:{tools}", "HOME": str(tmp_path),
           "SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_NUM_NODES": str(nodes),
           "RUN_DIR": str(tmp_path / "run")}
    return [shutil.which("bash"), str(path)], env


def run_script(tmp_path, script, nodes=1, job_id="4242"):
    cmd, env = script_command(tmp_path, script, nodes, job_id)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


def test_slurm_script_starts_one_torchrun_per_node_on_the_head_node(tmp_path):
    script = slurm_script(tmp_path, "--nodes", "1", "--gpus-per-node", "0", "--nproc-per-node", "2",
                          "--time", "2:00:00", "--partition", "batch", *BATCH, run=run_cli)  # the real command
    for line in ("#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --requeue", "#SBATCH --time=2:00:00",
                 "#SBATCH --partition=batch", "#SBATCH --signal=B:USR1@300",
                 f"#SBATCH --output={tmp_path / 'run-slurm'}/logs/slurm-%j.out"):
        assert line in script.splitlines()
    assert "--gpus-per-node" not in script and "NCCL_DEBUG" not in script  # CPU job
    fake_tools(tmp_path / "bin", "localhost\\nother\\n", 0, None)
    proc = run_script(tmp_path, script)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "run" / "srun.args").read_text().splitlines()
    assert f"--output={tmp_path / 'run-slurm'}/logs/slurm-%j-%N.out" in args  # one log per node, beside the run
    torchrun = args[args.index("-m") - 1:]
    assert torchrun[:3] == [shutil.which("python3") and torchrun[0], "-m", "torch.distributed.run"]
    assert "--nnodes=1" in torchrun and "--nproc-per-node=2" in torchrun and "--rdzv-backend=c10d" in torchrun
    assert f"--rdzv-endpoint=127.0.0.1:{20000 + 4242 % 20000}" in torchrun  # the head node, resolved
    assert "--rdzv-id=scaletrain-4242-0" in torchrun
    train = torchrun[torchrun.index("scaletrain"):]
    assert train[:6] == ["scaletrain", "train", "--config", str(REPO / "configs" / "debug.toml"), "--run-dir",
                         str(tmp_path / "run")]
    assert train[6:] == ["--set", "training.global_batch_size=16", "--set", "training.micro_batch_size=4"]


def test_slurm_script_fails_loudly_without_a_reachable_head_node(tmp_path):
    script = slurm_script(tmp_path, "--nodes", "2", "--gpus-per-node", "1", *BATCH)
    proc = run_script(tmp_path, script, nodes=2)  # no scontrol on PATH
    assert proc.returncode == 1 and "error: scontrol is not on PATH" in proc.stderr
    fake_tools(tmp_path / "bin", "localhost\\n", 0, None)
    proc = run_script(tmp_path, script, nodes=2)  # the head resolves to 127.0.0.1
    assert proc.returncode == 1 and "loopback address" in proc.stderr
    assert not (tmp_path / "run" / "srun.args").exists()  # no torchrun started


def test_slurm_script_exit_status_after_sigterm(tmp_path):
    """torchrun exits 1 after passing SIGTERM on; the job is a success exactly
    when the workers wrote their stopped-early summary after it started."""
    script = slurm_script(tmp_path, "--gpus-per-node", "0", *BATCH)
    fake_tools(tmp_path / "bin", "localhost\\n", 1, json.dumps({"stopped_early": True}))
    proc = run_script(tmp_path, script)
    assert proc.returncode == 0 and "stopped after a checkpoint" in proc.stdout, proc.stderr
    shutil.rmtree(tmp_path / "bin")
    fake_tools(tmp_path / "bin", "localhost\\n", 1, None)
    (tmp_path / "run" / "summary.json").unlink()
    proc = run_script(tmp_path, script)
    assert proc.returncode == 1 and "training failed" in proc.stderr


def test_slurm_placement_pins_nodes_and_gpus(tmp_path):
    placement = tmp_path / "job.json"
    placement.write_text(json.dumps({"hosts": ["n1", "n2"], "gpus": {"n1": [0, 1, 2, 3], "n2": [4, 5, 6, 7]}}))
    script = slurm_script(tmp_path, "--gpus-per-node", "8", "--placement", str(placement),
                          "--set", "training.global_batch_size=32", "--set", "training.micro_batch_size=4")
    assert "#SBATCH --nodes=2" in script and "#SBATCH --nodelist=n1,n2" in script
    assert "SCALETRAIN_NODE_GPUS='n1=0,1,2,3 n2=4,5,6,7'" in script and "--nproc-per-node=gpu" in script
    for name in ("TORCH_NCCL_ASYNC_ERROR_HANDLING=1", "TORCH_NCCL_DUMP_ON_TIMEOUT=1"):
        assert f"export {name}" in script


@pytest.mark.parametrize("args, needle", [
    (["--nodes", "0", "--gpus-per-node", "8"], "--nodes = 0"),
    (["--gpus-per-node", "2", "--nproc-per-node", "3"], "--nproc-per-node = 3"),
    (["--gpus-per-node", "1", "--env", "1BAD=x"], "--env '1BAD=x'"),
    (["--gpus-per-node", "0", "--nproc-per-node", "3", "--set", "parallel.tp=2"], "world"),
    (["--gpus-per-node", "1", "--set", "training.nope=1"], "unknown config key"),
    (["--gpus-per-node", "8"], "not divisible by micro_batch_size x data-parallel size = 4 x 8"),
    (["--gpus-per-node", "1", "--placement", "/nonexistent.json"], "does not exist"),
])
def test_launch_bad_input_writes_nothing(tmp_path, args, needle):
    for command in (["slurm", "--run-dir", str(tmp_path / "run")], ["k8s", "--image", "x", "-o", str(tmp_path / "m")]):
        proc = cli(["launch", *command, "--config", str(REPO / "configs" / "debug.toml"), *args])
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert needle in lines[0], lines[0]
        assert list(tmp_path.iterdir()) == []


def test_slurm_submit_errors_write_nothing(tmp_path, monkeypatch):
    args = ["launch", "slurm", "--config", str(REPO / "configs" / "debug.toml"), "--gpus-per-node", "1",
            "--run-dir", str(tmp_path / "run")]
    proc = cli(args + ["--dry-run", "--submit"])
    assert proc.returncode == 2 and "exclude each other" in proc.stderr
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    proc = cli(args + ["--submit"])
    assert proc.returncode == 2 and "sbatch is not on PATH" in proc.stderr
    assert list(tmp_path.iterdir()) == []


# -- Kubernetes -------------------------------------------------------------------

def manifest(tmp_path, *args):
    out = tmp_path / "jobset.yaml"
    proc = cli(["launch", "k8s", "--config", str(REPO / "configs" / "debug.toml"), "--image",
                    "registry.example/scaletrain:1", "-o", str(out), *args], timeout=60)
    assert proc.returncode == 0, proc.stderr
    return out, list(yaml.safe_load_all(out.read_text()))


def roundtrip(doc, model):
    """The document through the Kubernetes client's model and back: a
    misspelled or misplaced field is dropped, a wrong type is refused."""
    client = pytest.importorskip("kubernetes.client")
    api = client.ApiClient()
    return api.sanitize_for_serialization(api._ApiClient__deserialize(doc, model))


def test_k8s_manifest_is_valid_kubernetes(tmp_path):
    _, docs = manifest(tmp_path, "--nodes", "4", "--gpus-per-node", "8", "--max-restarts", "5", "--name", "llm",
                       "--set", "training.global_batch_size=64", "--set", "training.micro_batch_size=2")
    kinds = [d["kind"] for d in docs]
    assert kinds == ["Service", "ConfigMap", "PersistentVolumeClaim", "JobSet"]
    models = {"Service": "V1Service", "ConfigMap": "V1ConfigMap", "PersistentVolumeClaim": "V1PersistentVolumeClaim"}
    for doc in docs[:3]:
        assert roundtrip(doc, models[doc["kind"]]) == doc
    jobset = docs[3]
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
    assert set(jobset["spec"]) <= {"replicatedJobs", "network", "successPolicy", "failurePolicy", "startupPolicy",
                                   "suspend", "coordinator", "managedBy", "ttlSecondsAfterFinished"}
    # The JobSet's own fields, as kubernetes-sigs/jobset's v1alpha2 API types name them.
    assert set(jobset["spec"]["network"]) <= {"enableDNSHostnames", "subdomain", "publishNotReadyAddresses"}
    assert set(jobset["spec"]["failurePolicy"]) <= {"maxRestarts", "restartStrategy", "rules"}
    assert set(jobset["spec"]["replicatedJobs"][0]) <= {"name", "groupName", "template", "replicas", "dependsOn"}
    template = jobset["spec"]["replicatedJobs"][0]["template"]
    assert roundtrip(template, "V1JobTemplateSpec") == template
    assert jobset["spec"]["failurePolicy"] == {"maxRestarts": 5}
    assert template["spec"]["parallelism"] == template["spec"]["completions"] == 4
    service, config_map, claim = docs[:3]
    assert service["spec"]["clusterIP"] == "None"
    assert jobset["spec"]["network"]["subdomain"] == service["metadata"]["name"] == "llm"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    pod = template["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert "--rdzv-endpoint=llm-node-0-0.llm:29500" in container["command"]  # pod 0's JobSet DNS name
    assert "--nproc-per-node=8" in container["command"] and "--nnodes=4" in container["command"]
    assert {v["name"] for v in pod["volumes"]} == {"config", "runs", "dshm"}
    cfg = tomllib.loads(config_map["data"]["config.toml"])
    assert cfg["training"]["global_batch_size"] == 64
    assert cfg == load_config(REPO / "configs" / "debug.toml", ["training.global_batch_size=64",
                                                                "training.micro_batch_size=2"]).to_dict()


def test_k8s_placement_pins_hosts(tmp_path):
    placement = tmp_path / "p.json"
    placement.write_text(json.dumps({"hosts": ["g1", "g2"], "gpus": {"g1": [0, 1], "g2": [0, 1]}}))
    _, docs = manifest(tmp_path, "--gpus-per-node", "2", "--placement", str(placement), "--claim", "shared",
                       "--set", "training.micro_batch_size=2")
    assert [d["kind"] for d in docs] == ["Service", "ConfigMap", "JobSet"]  # existing claim: none created
    pod = docs[-1]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    term = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    assert term["matchExpressions"][0]["values"] == ["g1", "g2"]
    assert {"name": "runs", "persistentVolumeClaim": {"claimName": "shared"}} in pod["volumes"]
    placement.write_text(json.dumps({"hosts": ["g1", "g2"], "gpus": {"g1": [0, 1], "g2": [0]}}))
    proc = cli(["launch", "k8s", "--config", str(REPO / "configs" / "debug.toml"), "--image", "x",
                    "--gpus-per-node", "2", "--placement", str(placement), "--set", "training.global_batch_size=12",
                    "--set", "training.micro_batch_size=4"], timeout=60)
    assert proc.returncode == 2 and "different GPU counts" in proc.stderr


def _resources(group_version, *kinds):
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
            "resources": [{"name": plural, "singularName": "", "namespaced": True, "kind": kind,
                           "verbs": ["create", "get", "list", "patch", "update", "delete"]} for plural, kind in kinds]}


class _Discovery(BaseHTTPRequestHandler):
    """What kubectl asks an API server before a client-side dry run: the
    versions and kinds it serves (here: core v1 and the JobSet CRD), then each
    object, which does not exist yet (404)."""

    ROUTES = {
        "/version": {"major": "1", "minor": "32", "gitVersion": "v1.32.0"},
        "/api": {"kind": "APIVersions", "versions": ["v1"],
                 "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]},
        "/api/v1": _resources("v1", ("services", "Service"), ("configmaps", "ConfigMap"),
                              ("persistentvolumeclaims", "PersistentVolumeClaim")),
        "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": [{
            "name": "jobset.x-k8s.io", "versions": [{"groupVersion": "jobset.x-k8s.io/v1alpha2", "version": "v1alpha2"}],
            "preferredVersion": {"groupVersion": "jobset.x-k8s.io/v1alpha2", "version": "v1alpha2"}}]},
        "/apis/jobset.x-k8s.io/v1alpha2": _resources("jobset.x-k8s.io/v1alpha2", ("jobsets", "JobSet")),
    }

    def do_GET(self):
        body = self.ROUTES.get(self.path.split("?")[0])
        code = 200 if body else 404
        body = body or {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kubectl_client_dry_run(tmp_path):
    out, docs = manifest(tmp_path, "--gpus-per-node", "0")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Discovery)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        def kubectl_apply(path):
            return subprocess.run(["kubectl", "apply", "--dry-run=client", "--validate=false", "-s",
                                   f"http://127.0.0.1:{server.server_address[1]}", "-f", str(path)],
                                  capture_output=True, text=True, timeout=60,
                                  env={"HOME": str(tmp_path), "PATH": os.environ["PATH"]})

        proc = kubectl_apply(out)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines() == [
            "service/scaletrain-debug created (dry run)", "configmap/scaletrain-debug-config created (dry run)",
            "persistentvolumeclaim/scaletrain-debug-runs created (dry run)",
            "jobset.jobset.x-k8s.io/scaletrain-debug created (dry run)"]
        docs[-1]["apiVersion"] = "jobset.x-k8s.io/v1"  # a version the cluster does not serve
        broken = tmp_path / "broken.yaml"
        broken.write_text(yaml.safe_dump_all(docs))
        proc = kubectl_apply(broken)
        assert proc.returncode != 0 and "JobSet" in proc.stderr
    finally:
        server.shutdown()


def _signal_tools(bin_dir):
    """srun that runs until scancel (or the test) drops a stop file, then leaves a stopped-early
    summary and exits 1 as torchrun does after SIGTERM; scancel/scontrol that record their calls."""
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\ntouch "$RUN_DIR/srun.started"\n'
                                  'while [ ! -f "$RUN_DIR/stop" ]; do sleep 0.05; done\n'
                                  "printf '{\"stopped_early\": true}' > \"$RUN_DIR/summary.json\"\nexit 1\n")
    (bin_dir / "scancel").write_text('#!/bin/bash\necho "scancel $*" >> "$RUN_DIR/calls"\ntouch "$RUN_DIR/stop"\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\nif [ "$1" = show ]; then echo localhost; '
                                      'else echo "scontrol $*" >> "$RUN_DIR/calls"; fi\n')
    for tool in ("srun", "scancel", "scontrol"):
        (bin_dir / tool).chmod(0o755)


@pytest.mark.parametrize("signal_name", ["SIGUSR1", "SIGTERM"])
def test_slurm_script_time_limit_and_preemption(tmp_path, signal_name):
    """USR1 (Slurm's warning before --time runs out): stop the workers with
    SIGTERM, then requeue. SIGTERM to the batch shell (preemption): wait for
    the workers to save; Slurm requeues the job itself."""
    import signal
    import time

    script = slurm_script(tmp_path, "--gpus-per-node", "0", "--time", "1:00:00", *BATCH)
    _signal_tools(tmp_path / "bin")
    run = tmp_path / "run"
    cmd, env = script_command(tmp_path, script, job_id="77")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (run / "srun.started").exists():
            assert time.monotonic() < deadline, "srun never started"
            time.sleep(0.05)
        proc.send_signal(getattr(signal, signal_name))
        if signal_name == "SIGTERM":
            time.sleep(0.5)
            assert proc.poll() is None  # still waiting for the workers
            (run / "stop").touch()  # Slurm's SIGTERM reaches the workers, which save and stop
        out, err = proc.communicate(timeout=30)
    finally:
        (run / "stop").touch()  # lets the stand-in srun end whatever happened
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, err
    calls = (run / "calls").read_text().splitlines() if (run / "calls").exists() else []
    if signal_name == "SIGUSR1":
        assert calls == ["scancel --signal=TERM 77", "scontrol requeue 77"]
    else:
        assert calls == [] and "waiting for the workers to checkpoint" in out
