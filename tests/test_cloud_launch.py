"""The cloud launch files, run for real: launch/k8s/pytorchjob.yaml (Kubeflow PyTorchJob) and launch/skypilot.yaml.

Each file's command is taken from the file and run as written (`bash -c` with the file's own text; editing the
file changes what runs here) as 2 "nodes" x 1 process on loopback, each node with the environment its platform
gives it:
- PyTorchJob: per pod, the container's `env`, then what the Training Operator adds (release 1.9,
  pkg/controller.v1/pytorch/envvar.go and master.go): PYTHONUNBUFFERED, MASTER_ADDR / PET_MASTER_ADDR
  (<job>-master-0), MASTER_PORT / PET_MASTER_PORT (the port named pytorchjob-port), WORLD_SIZE (replicas x
  nprocPerNode), RANK and PET_NODE_RANK (master 0, worker i -> i + 1), PET_NPROC_PER_NODE, PET_NNODES.
- SkyPilot: the task's `envs`, then SKYPILOT_NODE_RANK, SKYPILOT_NODE_IPS (one per line, rank 0 first),
  SKYPILOT_NUM_NODES and SKYPILOT_NUM_GPUS_PER_NODE, with `run` on every node.
Mapped for a CPU machine, and nothing else: the size (1 replica per role, 1 process per node), the port (a free
one, as a user would edit it or pass `--env MASTER_PORT=...`), the master's service name -> 127.0.0.1, the
volume / bucket mount paths and the config path -> tmp paths (the config is the tiny CPU run, not the file's
7B example), and CPU DDP over gloo (ACCELERATE_USE_CPU=true, CUDA_VISIBLE_DEVICES="", as ORPO_CPU=1 does for
the launch/ scripts).

Structure, against the platforms' own code: the manifest is deserialized into the Training Operator SDK's
models (kubeflow-training: KubeflowOrgV1PyTorchJob, and the kubernetes client's V1ConfigMap /
V1PersistentVolumeClaim) and must serialize back unchanged (the models drop unknown keys, so a typo shows),
plus the operator's admission rules (pkg/webhooks/pytorch); skypilot.yaml goes through `sky.Task.from_yaml`,
which checks it against SkyPilot's schema. SkyPilot pins click<8.2, which this project's huggingface_hub and
wandb refuse, so it lives in its own venv (.venv-sky); scripts/install_cloud_tools.sh installs both tools, and
the `cloud_tools` fixture runs it (idempotent) the first time a test here needs them, so CI never skips these
(under CI=true a tool that still cannot be found fails instead of skipping). Those tests are in the slow tier.
The Dockerfile is only checked statically (no Docker here).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from helpers import N_PAIRS, REPO, SAVE_AT, STEPS, TINY_YAML, free_port, launch_env, read_jsonl

K8S = REPO / "launch" / "k8s" / "pytorchjob.yaml"
DOCKERFILE = REPO / "launch" / "k8s" / "Dockerfile"
SKY = REPO / "launch" / "skypilot.yaml"
SKY_PYTHON = Path(os.environ.get("ORPO_SKY_PYTHON", REPO / ".venv-sky" / "bin" / "python"))
PREEMPT_STEPS = 60  # long enough that SIGTERM, sent at the first step, lands well before the end
TIMEOUT = 420  # per launch: a rendezvous or collective that hangs fails the test


@pytest.fixture(scope="session")
def cloud_tools():
    """kubeflow-training into this Python, skypilot into .venv-sky: installed where the tests need them."""
    proc = subprocess.run(["bash", str(REPO / "scripts" / "install_cloud_tools.sh")], cwd=REPO,
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=900)  # fmt: skip
    if proc.returncode != 0:
        missing_tool(f"the cloud tools (install failed: {(proc.stdout + proc.stderr)[-500:]})")


def missing_tool(what: str) -> None:
    """Skip where a developer has not installed the tool; fail under CI, which installs it."""
    msg = f"{what} is not installed: run `bash scripts/install_cloud_tools.sh`"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


# ------------------------------------------------------------------------------------------- reading


def k8s_docs() -> dict[str, dict]:
    """kind -> document. YAML aliases (the Worker's `template: *pod`) resolve as kubectl resolves them."""
    return {d["kind"]: d for d in yaml.safe_load_all(K8S.read_text()) if d}


def pytorch_container(replica: dict) -> dict:
    return next(c for c in replica["template"]["spec"]["containers"] if c["name"] == "pytorch")


def k8s_command() -> str:
    """The Master container's command line as the file has it (argv joined)."""
    container = pytorch_container(k8s_docs()["PyTorchJob"]["spec"]["pytorchReplicaSpecs"]["Master"])
    return " ".join(container["command"] + container["args"])


def sky_task() -> dict:
    return yaml.safe_load(SKY.read_text())


def substitute(text: str, mounts: dict[str, Path]) -> str:
    """Mount paths in a command or value -> the local directories standing in for the volumes."""
    for mount, local in mounts.items():
        text = re.sub(rf"(?<![\w./-]){re.escape(mount)}(?=/|[\s\"']|$)", str(local), text)
    return text


def tiny_config(path: Path, model_dir: Path, **overrides) -> Path:
    """The CPU run that stands in for the file's config (same place, other content)."""
    config = {**yaml.safe_load(TINY_YAML.read_text()), "model": str(model_dir), **overrides}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))  # each key once: a key given twice is refused
    return path


def cpu_env(trace: Path) -> dict[str, str]:
    return launch_env(
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),  # torchrun, python
        ACCELERATE_USE_CPU="true",  # DDP over gloo, as ORPO_CPU=1 does in the launch/ scripts
        ORPO_DIST_TRACE_DIR=str(trace),
    )


# ---------------------------------------------------------------------------- the Training Operator


def operator_env(job: dict, rtype: str, index: int) -> dict[str, str]:
    """What the Training Operator (v1.9, non-elastic job with a Master) adds to the container named pytorch."""
    spec = job["spec"]
    replicas = spec["pytorchReplicaSpecs"]
    total = sum(r.get("replicas", 1) for r in replicas.values())
    nproc = spec.get("nprocPerNode")
    ports = pytorch_container(replicas["Master"]).get("ports", [])
    port = next((p["containerPort"] for p in ports if p["name"] == "pytorchjob-port"), 23456)  # its default
    addr = f"{job['metadata']['name']}-master-0"
    rank = index + (1 if rtype == "Worker" else 0)
    env = {
        "PYTHONUNBUFFERED": "1",
        "MASTER_PORT": str(port),
        "PET_MASTER_PORT": str(port),
        "MASTER_ADDR": addr,
        "PET_MASTER_ADDR": addr,
        "WORLD_SIZE": str(total * (int(nproc) if str(nproc).isdigit() else 1)),
        "RANK": str(rank),
        "PET_NODE_RANK": str(rank),
    }
    if nproc is not None:
        env["PET_NPROC_PER_NODE"] = str(nproc)
    assert "elasticPolicy" not in spec  # with one, PET_NNODES would be min:max of the Workers and c10d added
    env["PET_NNODES"] = str(total)
    return env


def container_env(container: dict, mounts: dict[str, Path]) -> dict[str, str]:
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = substitute(str(var["value"]), mounts)
        else:  # the kubelet leaves out a variable whose optional secret does not exist
            assert var["valueFrom"]["secretKeyRef"].get("optional"), f"{var['name']}: a required secret"
    return env


class K8sCluster:
    """The PyTorchJob's pods as processes: 1 Master + 1 Worker, 1 process each, volumes as tmp directories."""

    def __init__(self, tmp: Path, model_dir: Path, **config):
        docs = k8s_docs()
        self.job = json.loads(json.dumps(docs["PyTorchJob"]))  # a copy, aliases expanded
        spec = self.job["spec"]
        spec["nprocPerNode"] = "1"
        spec["pytorchReplicaSpecs"]["Worker"]["replicas"] = 1
        self.port = free_port()
        for replica in spec["pytorchReplicaSpecs"].values():
            for p in pytorch_container(replica)["ports"]:
                if p["name"] == "pytorchjob-port":
                    p["containerPort"] = self.port
        pod = spec["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        self.mounts: dict[str, Path] = {}
        for m in pytorch_container(spec["pytorchReplicaSpecs"]["Master"])["volumeMounts"]:
            volume = volumes[m["name"]]
            if "persistentVolumeClaim" in volume:
                self.mounts[m["mountPath"]] = self.shared = tmp / "pvc"
            elif "configMap" in volume:
                local = self.mounts[m["mountPath"]] = tmp / "configmap"
                assert volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
                for key in docs["ConfigMap"]["data"]:  # each key is a file in the mount
                    tiny_config(local / key, model_dir, **config)
            # /dev/shm (emptyDir, medium Memory): this machine's own /dev/shm
        self.shared.mkdir()
        self.trace = tmp / "trace"
        self.trace.mkdir()
        self.tmp = tmp

    def pods(self) -> list[tuple[str, list[str], dict[str, str]]]:
        out = []
        for rtype in ("Master", "Worker"):
            replica = self.job["spec"]["pytorchReplicaSpecs"][rtype]
            container = pytorch_container(replica)
            argv = container["command"] + container["args"]  # what the container runs
            assert argv[:2] == ["bash", "-c"], argv
            argv = [substitute(a, self.mounts) for a in argv]
            for index in range(replica["replicas"]):
                env = {**cpu_env(self.trace), **container_env(container, self.mounts)}
                operator = operator_env(self.job, rtype, index)
                for key in ("MASTER_ADDR", "PET_MASTER_ADDR"):  # the master's service name, on loopback
                    operator[key] = "127.0.0.1"
                env.update(operator)
                out.append((f"{rtype.lower()}-{index}", argv, env))
        return out


# ------------------------------------------------------------------------------------------- SkyPilot


class SkyCluster:
    """`run` on 2 nodes as SkyPilot runs it, bucket mounts as tmp directories, from the workdir (this checkout)."""

    def __init__(self, tmp: Path, model_dir: Path, **config):
        self.task = sky_task()
        self.mounts = {path: tmp / "bucket" / path.strip("/") for path in self.task["file_mounts"]}
        for local in self.mounts.values():
            local.mkdir(parents=True)
        self.shared = next(iter(self.mounts.values()))
        self.trace = tmp / "trace"
        self.trace.mkdir()
        # as `sky jobs launch --env CONFIG=... --env MASTER_PORT=...` would override the task's envs
        self.overrides = {
            "CONFIG": str(tiny_config(tmp / "run.yaml", model_dir, **config)),
            "MASTER_PORT": str(free_port()),
        }
        self.tmp = tmp

    def pods(self, nodes: int = 2) -> list[tuple[str, list[str], dict[str, str]]]:
        script = substitute(self.task["run"], self.mounts)
        out = []
        for rank in range(nodes):
            env = cpu_env(self.trace)
            env.update({k: str(v) for k, v in self.task.get("envs", {}).items()})
            env.update(self.overrides)
            env.update(
                SKYPILOT_NODE_RANK=str(rank),
                SKYPILOT_NODE_IPS="\n".join(["127.0.0.1"] * nodes),
                SKYPILOT_NUM_NODES=str(nodes),
                SKYPILOT_NUM_GPUS_PER_NODE="1",
                SKYPILOT_TASK_ID=f"sky-test-{os.getpid()}_orpo_1",
            )
            out.append((f"node-{rank}", ["bash", "-c", script], env))
        return out


# ----------------------------------------------------------------------------------------- running


def start(pods, logs: Path, tag: str, cwd: Path | None = None) -> list[tuple[str, subprocess.Popen, Path]]:
    started = []
    for name, argv, env in pods:
        log = logs / f"{tag}-{name}.log"
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd or logs,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # like a machine of its own: signals to the node reach no other
        )
        started.append((name, proc, log))
    return started


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL a "node": its shell and every descendant. torchrun starts each trainer in a session of its own,
    so killing the shell's process group alone would leave the trainers running."""
    try:
        tree = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        tree = []
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def wait(started, timeout: float = TIMEOUT) -> list[tuple[int, str]]:
    """Wait for every node; one that fails gives the others 60 s (they would wait for their peer); kill on hang."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    procs = [p for _, p, _ in started]
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):
            deadline = min(deadline, time.monotonic() + 60)
        time.sleep(0.2)
    hung = [name for name, p, _ in started if p.poll() is None]
    for _, p, _ in started:
        if p.poll() is None:
            kill_node(p)
    results = [(p.returncode, log.read_text(errors="replace")) for _, p, log in started]
    if hung:
        elapsed = time.monotonic() - t0
        pytest.fail(
            f"{hung} still running after {elapsed:.0f} s (hung rendezvous?):\n{results[0][1][-3000:]}"
        )
    return results


def assert_trained_together(results, out: Path, trace: Path, steps: int = STEPS) -> None:
    for rc, log in results:
        assert rc == 0, f"exit {rc}:\n{log[-5000:]}"
    logs = "".join(log for _, log in results)
    # exactly one rank 0 over both nodes printed the launch summary, with both ranks in one process group
    assert logs.count("world_size=2 distributed=MULTI_CPU ") == 1, logs[-5000:]
    rows = [row for f in sorted(trace.glob("rank*.jsonl")) for row in read_jsonl(f)]
    assert {r["rank"] for r in rows} == {0, 1} and {r["world_size"] for r in rows} == {2}
    for rank in (0, 1):
        assert sorted(r["step"] for r in rows if r["rank"] == rank) == list(range(1, steps + 1))
    first_epoch = [[i for r in rows if r["rank"] == k and r["step"] <= 5 for i in r["ids"]] for k in (0, 1)]
    assert not set(first_epoch[0]) & set(first_epoch[1]), "both ranks trained on the same pairs"
    assert sorted(first_epoch[0] + first_epoch[1]) == list(range(N_PAIRS))
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, steps + 1))
    assert (out / f"checkpoint-{SAVE_AT}" / "COMPLETE").exists()
    assert (out / "final" / "config.json").exists() and list((out / "final").glob("*.safetensors"))


def output_mount(command: str, mount_paths) -> tuple[str, str]:
    """(--output_dir as the command gives it, the mount it lies on): it must be on a shared volume / bucket."""
    args = shlex.split(command.replace("\\\n", " "))
    path = args[args.index("--output_dir") + 1]
    found = [m for m in mount_paths if path.startswith(m.rstrip("/") + "/")]
    assert found, f"--output_dir {path} is on none of the shared mounts {sorted(mount_paths)}"
    return path, found[0]


def output_dir(command: str, mounts: dict[str, Path]) -> Path:
    """The --output_dir the command gives, where the test's stand-in for its volume puts it."""
    path, mount = output_mount(command, mounts)
    return mounts[mount] / Path(path).relative_to(mount)


# --------------------------------------------------------------------------------------- runs: k8s


def wait_until(done, started) -> None:
    """Poll `done()` while every node runs; on a timeout or a node that ended first, kill them all and fail."""
    deadline = time.monotonic() + TIMEOUT
    while not done():
        if time.monotonic() > deadline or any(p.poll() is not None for _, p, _ in started):
            for _, proc, _ in started:
                kill_node(proc)
            pytest.fail(f"the run ended or stalled first:\n{started[0][2].read_text()[-3000:]}")
        time.sleep(0.05)


@pytest.mark.slow
def test_pytorchjob_pods_train_together(tmp_path, tiny_model_dir):
    cluster = K8sCluster(tmp_path, tiny_model_dir)
    pods = cluster.pods()
    assert [env["PET_NODE_RANK"] for _, _, env in pods] == ["0", "1"]
    results = wait(start(pods, tmp_path, "run"))
    out = output_dir(k8s_command(), cluster.mounts)
    assert out.is_relative_to(cluster.shared)
    assert_trained_together(results, out, cluster.trace)


@pytest.mark.slow
def test_pytorchjob_preempted_pod_checkpoints_and_the_same_command_resumes(tmp_path, tiny_model_dir):
    """Eviction: SIGTERM to the Master pod's PID 1 only (what the kubelet does); both pods restart as they were."""
    cluster = K8sCluster(tmp_path, tiny_model_dir, max_steps=PREEMPT_STEPS, save_steps=1000)
    out = output_dir(k8s_command(), cluster.mounts)
    started = start(cluster.pods(), tmp_path, "first")
    wait_until(lambda: read_jsonl(cluster.trace / "rank0.jsonl"), started)  # training: handlers are set
    started[0][1].send_signal(signal.SIGTERM)  # that pid is the container's PID 1: bash exec'd torchrun
    results = wait(started)
    log = results[0][1]
    saved = re.search(r"preempted: checkpoint saved at step (\d+)", log)
    assert saved, log[-4000:]
    step = int(saved.group(1))
    assert 1 <= step < PREEMPT_STEPS and (out / f"checkpoint-{step}" / "COMPLETE").exists()
    # non-zero on both pods: restartPolicy OnFailure restarts them (exit 0 would end the job as Succeeded)
    assert all(rc != 0 for rc, _ in results), [rc for rc, _ in results]

    # the restarted containers: the same command and environment
    results = wait(start(cluster.pods(), tmp_path, "second"))
    for rc, text in results:
        assert rc == 0, text[-4000:]
    log = results[0][1]
    assert re.search(rf"resumed from \S+/checkpoint-{step} at step {step}\b", log), log[-4000:]
    # nothing lost, nothing repeated
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, PREEMPT_STEPS + 1))
    assert (out / "final" / "config.json").exists()


# ---------------------------------------------------------------------------------- runs: SkyPilot


@pytest.mark.slow
def test_skypilot_nodes_train_together(tmp_path, tiny_model_dir):
    cluster = SkyCluster(tmp_path, tiny_model_dir)
    results = wait(start(cluster.pods(), tmp_path, "run", cwd=REPO))  # run starts in workdir: the checkout
    out = output_dir(cluster.task["run"], cluster.mounts)
    assert out.is_relative_to(cluster.shared)
    assert_trained_together(results, out, cluster.trace)


@pytest.mark.slow
@pytest.mark.usefixtures("cloud_tools")
def test_skypilot_node_loss_and_the_same_run_resumes(tmp_path, tiny_model_dir):
    """A reclaimed spot VM gives no warning: every process dies at once (SIGKILL). The managed job's recovery
    runs `run` again on new nodes; --resume auto must continue from the last complete checkpoint in the bucket."""
    cluster = SkyCluster(tmp_path, tiny_model_dir, max_steps=PREEMPT_STEPS, save_steps=10)
    out = output_dir(cluster.task["run"], cluster.mounts)
    started = start(cluster.pods(), tmp_path, "first", cwd=REPO)
    wait_until(lambda: (out / "checkpoint-10" / "COMPLETE").exists(), started)
    for _, proc, _ in started:  # the VMs are gone, with every process on them
        kill_node(proc)
    saved = [int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "COMPLETE").exists()]
    newest = max(saved)
    assert newest < PREEMPT_STEPS and not (out / "final").exists()

    results = wait(start(cluster.pods(), tmp_path, "second", cwd=REPO))
    for rc, text in results:
        assert rc == 0, text[-4000:]
    log = results[0][1]
    assert "world_size=2 distributed=MULTI_CPU" in log
    assert re.search(rf"resumed from \S+/checkpoint-{newest} at step {newest}\b", log), log[-4000:]
    rows = read_jsonl(out / "metrics.jsonl")
    assert rows[-1]["step"] == PREEMPT_STEPS and (out / "final" / "config.json").exists()


# ------------------------------------------------------------------------------ structure: Kubernetes

SDK_MODELS = {  # kind -> (apiVersion, model in kubeflow.training.models, which re-exports kubernetes.client's)
    "PyTorchJob": ("kubeflow.org/v1", "KubeflowOrgV1PyTorchJob"),
    "ConfigMap": ("v1", "V1ConfigMap"),
    "PersistentVolumeClaim": ("v1", "V1PersistentVolumeClaim"),
}


def json_diff(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(a.keys() | b.keys()):
            if key not in b:
                out.append(f"{path}.{key}: dropped by the model (not a field there: a typo or wrong level?)")
            elif key not in a:
                out.append(f"{path}.{key}: added by the model")
            else:
                out += json_diff(a[key], b[key], f"{path}.{key}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in json_diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} became {b!r}"]


def sdk_roundtrip(doc: dict, model: str) -> list[str]:
    """Deserialize into the SDK's model as the SDK reads API objects, serialize back, report the differences."""
    try:
        from kubeflow.training import ApiClient
    except ImportError:
        missing_tool("kubeflow-training (the Training Operator SDK)")

    class Response:  # ApiClient.deserialize reads an HTTP response's .data
        data = json.dumps(doc)

    client = ApiClient()
    obj = client.deserialize(Response, model)  # a required field missing raises ValueError here
    assert type(obj).__name__ == model
    return json_diff(json.loads(json.dumps(doc)), client.sanitize_for_serialization(obj))


@pytest.mark.slow
@pytest.mark.usefixtures("cloud_tools")
def test_manifest_is_what_the_training_operator_sdk_models_describe():
    docs = k8s_docs()
    assert set(docs) == set(SDK_MODELS)
    for kind, (api_version, model) in SDK_MODELS.items():
        assert docs[kind]["apiVersion"] == api_version, kind
        problems = sdk_roundtrip(docs[kind], model)
        assert not problems, f"{kind}: " + "; ".join(problems)


@pytest.mark.slow
@pytest.mark.usefixtures("cloud_tools")
def test_sdk_check_catches_mistakes():
    job = k8s_docs()["PyTorchJob"]
    bad = json.loads(json.dumps(job))
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["restartPolcy"] = "OnFailure"
    pytorch_container(bad["spec"]["pytorchReplicaSpecs"]["Master"])["volumeMount"] = []
    problems = sdk_roundtrip(bad, "KubeflowOrgV1PyTorchJob")
    assert any("restartPolcy" in p for p in problems) and any("volumeMount:" in p for p in problems), problems
    del pytorch_container(bad["spec"]["pytorchReplicaSpecs"]["Master"])["name"]
    with pytest.raises(ValueError, match="name"):
        sdk_roundtrip(bad, "KubeflowOrgV1PyTorchJob")


def test_manifest_follows_the_operator_rules_and_ours():
    docs = k8s_docs()
    job, spec = docs["PyTorchJob"], docs["PyTorchJob"]["spec"]
    replicas = spec["pytorchReplicaSpecs"]
    # the operator's admission webhook (pkg/webhooks/pytorch, release 1.9)
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", job["metadata"]["name"]), "name: a DNS-1035 label"
    assert set(replicas) == {"Master", "Worker"}
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] >= 1
    # elasticPolicy with a Master: PET_NNODES would count the Workers only and c10d would meet at worker-0
    assert "elasticPolicy" not in spec
    for name, replica in replicas.items():
        container = pytorch_container(replica)  # StopIteration: no container named "pytorch"
        assert container["image"], name
        # exit 3 (preempted) and a peer's failure are non-zero: OnFailure restarts; Never / ExitCode would not
        assert replica["restartPolicy"] == "OnFailure", name
        assert any(p["name"] == "pytorchjob-port" for p in container["ports"]), name
        assert container["resources"]["limits"]["nvidia.com/gpu"] == spec["nprocPerNode"], "1 process per GPU"
    pod = replicas["Master"]["template"]["spec"]
    container = pytorch_container(replicas["Master"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"  # the default 64 MiB breaks NCCL
    pvc = docs["PersistentVolumeClaim"]
    shared = [
        p
        for p, v in mounts.items()
        if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]
    ]
    assert len(shared) == 1 and pvc["spec"]["accessModes"] == ["ReadWriteMany"], "pods on many nodes share it"
    assert any(
        v.get("configMap", {}).get("name") == docs["ConfigMap"]["metadata"]["name"] for v in mounts.values()
    )
    # SIGTERM must reach torchrun (PID 1), which must wait for the save, within the pod's grace period
    script = container["args"][0]
    assert container["command"] == ["bash", "-c"] and re.match(r"exec torchrun\b", script.strip()), script
    assert "--resume auto" in script and output_mount(script, shared)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert 120 <= int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) < pod["terminationGracePeriodSeconds"]


def test_manifest_config_and_command_are_valid_trainer_arguments(tmp_path):
    from orpo_dist.cli import parse

    docs = k8s_docs()
    container = pytorch_container(docs["PyTorchJob"]["spec"]["pytorchReplicaSpecs"]["Master"])
    args = shlex.split(container["args"][0])
    args = args[args.index("orpo_dist.train") + 1 :]
    config = Path(args[args.index("--config") + 1])
    pod = docs["PyTorchJob"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    from_configmap = {v["name"] for v in pod["volumes"] if "configMap" in v}
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] in from_configmap)
    assert config.parent == Path(mount), f"--config {config} is not in the ConfigMap's mount {mount}"
    local = tmp_path / config.name
    local.write_text(docs["ConfigMap"]["data"][config.name])
    args[args.index("--config") + 1] = str(local)
    cfg, _ = parse(args)  # ConfigError on an unknown key or a bad value, as the trainer would stop
    assert cfg.train.resume == "auto" and cfg.train.output_dir.startswith("/shared/")


@pytest.mark.slow
@pytest.mark.usefixtures("cloud_tools")
def test_dockerfile_builds_what_the_manifest_runs():
    """Static only (no Docker here): a CUDA base, sources that exist, extras that exist, recent torchrun."""
    from importlib.metadata import metadata

    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+", text, re.M)
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for src in line.split()[:-1]:
            assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    extras = set(re.search(r'pip install "\.\[([\w,]+)\]"', text).group(1).split(","))
    known = set(metadata("orpo-dist").get_all("Provides-Extra"))  # pyproject.toml's optional-dependencies
    assert extras <= known, extras - known
    assert "--shutdown-timeout" in text  # what TORCH_ELASTIC_SHUTDOWN_TIMEOUT in the manifest needs
    assert "launch/k8s/Dockerfile" in K8S.read_text()


# -------------------------------------------------------------------------------- structure: SkyPilot

SKY_READ = """
import json, sys, sky
task = sky.Task.from_yaml(sys.argv[1])  # SkyPilot's schema check: unknown keys and bad values raise
(res,) = task.resources
print(json.dumps({
    "num_nodes": task.num_nodes, "workdir": task.workdir, "accelerators": res.accelerators,
    "job_recovery": res.job_recovery, "envs": task.envs, "setup": task.setup, "run": task.run,
    "buckets": {p: s.mode.value for p, s in task.storage_mounts.items()},
}))
"""


def sky_from_yaml(path: Path, home: Path) -> subprocess.CompletedProcess:
    if not SKY_PYTHON.exists():
        missing_tool(f"skypilot ({SKY_PYTHON})")
    env = {**os.environ, "HOME": str(home)}  # SkyPilot writes ~/.sky
    return subprocess.run(
        [str(SKY_PYTHON), "-c", SKY_READ, str(path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
@pytest.mark.usefixtures("cloud_tools")
def test_skypilot_yaml_is_a_valid_sky_task(tmp_path):
    out = sky_from_yaml(SKY, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    task = json.loads(out.stdout.splitlines()[-1])
    assert task["run"] == sky_task()["run"]  # SkyPilot runs the very text the run tests run
    assert task["num_nodes"] >= 2 and len(task["accelerators"]) == 1
    assert task["job_recovery"]["max_restarts_on_errors"] >= 1
    assert re.search(r'pip install (-e )?"\.\[', task["setup"]), "setup installs this checkout (workdir)"
    assert task["workdir"] == "."
    # output_dir is in a bucket (it outlives the cluster) mounted in a mode that supports appends and rewrites
    _, bucket = output_mount(task["run"], task["buckets"])
    assert task["buckets"][bucket] == "MOUNT_CACHED"

    bad = tmp_path / "bad.yaml"  # and the check can fail
    bad.write_text(SKY.read_text().replace("job_recovery:", "job_recovry:"))
    out = sky_from_yaml(bad, tmp_path)
    assert out.returncode != 0 and "job_recovery" in out.stderr, out.stderr[-2000:]


def test_skypilot_run_uses_its_variables_and_keeps_the_upload_flush():
    run = sky_task()["run"]
    for var in (
        "SKYPILOT_NODE_RANK",
        "SKYPILOT_NODE_IPS",
        "SKYPILOT_NUM_NODES",
        "SKYPILOT_NUM_GPUS_PER_NODE",
    ):
        assert f"${var}" in run or f"${{{var}}}" in run, var
    # SkyPilot appends the MOUNT_CACHED flush to this script: exec or exit would skip it
    assert not re.search(r"^\s*(exec|exit)\b", run, re.M)
    assert "--resume auto" in run
