"""Every shipped accelerate config and launcher is a tested artifact.

Configs: each YAML parses as accelerate 1.x reads it, its header carries its own launch line, and that
exact line, run through `accelerate launch`'s own parser and validation, yields the launcher environment
and the DeepSpeed / FSDP plugin we mean (built on CPU, nothing launched).
Launchers: `bash -n`, `--help`, the command each composes (DRY_RUN=1), and a real 2-process CPU run for
each launcher. FSDP2 training on CPU ranks is tests/test_fsdp2.py.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ACCEL as CONFIG_DIR
from helpers import OFFLINE_ENV, TINY_YAML
from helpers import REPO as ROOT

CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
SCRIPTS = sorted(
    [
        *ROOT.glob("launch/*.sh"),
        *ROOT.glob("slurm/*"),
        *ROOT.glob("tests/slurm/*.sh"),
        ROOT / "scripts/ci_slurm_setup.sh",
    ]
)

# What each file must configure: (distributed type, processes per machine, machines, DeepSpeed settings).
ZERO3 = dict(
    zero_stage=3,
    offload_optimizer_device="none",
    offload_param_device="none",
    zero3_init_flag=True,
    zero3_save_16bit_model=True,
)
EXPECTED = {
    "single_gpu": ("NO", 1, 1, None),
    "multi_gpu": ("MULTI_GPU", 8, 1, None),
    "zero1": (
        "DEEPSPEED",
        8,
        1,
        dict(zero_stage=1, offload_optimizer_device="none", offload_param_device="none"),
    ),
    "zero2": (
        "DEEPSPEED",
        8,
        1,
        dict(zero_stage=2, offload_optimizer_device="none", offload_param_device="none"),
    ),
    "zero3": (
        "DEEPSPEED",
        8,
        1,
        ZERO3,
    ),
    "zero3_sp": (
        "DEEPSPEED",
        8,
        1,
        ZERO3,
    ),
    "zero3_offload": (
        "DEEPSPEED",
        8,
        1,
        dict(ZERO3, offload_optimizer_device="cpu", offload_param_device="cpu"),
    ),
    "fsdp2": ("FSDP", 8, 1, None),
    "multi_node": (
        "DEEPSPEED",
        8,
        2,
        ZERO3,
    ),
}
# Values substituted for the shell variables in the documented launch lines.
LINE_VARS = {"NODE_RANK": "1", "MASTER_ADDR": "10.1.2.3"}


def header(path: Path) -> str:
    lines = path.read_text().splitlines()
    return "\n".join(line for line in lines[: next(i for i, x in enumerate(lines) if not x.startswith("#"))])


def launch_line(path: Path) -> list[str]:
    """The `accelerate launch ...` line of the header, as argv after `accelerate launch`, vars filled in."""
    match = re.search(r"^#\s+accelerate launch (.+)$", header(path), re.M)
    assert match, f"{path.name}: header has no '#   accelerate launch ...' line"
    text = re.sub(r"\$(\w+)", lambda m: LINE_VARS[m.group(1)], match.group(1))
    return shlex.split(text)


def validated_launch(argv: list[str]):
    """Run argv through `accelerate launch`'s parser and validation (what it does before starting anything)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(argv)
    args, defaults, mp_from_config = _validate_launch_command(args)
    return args, defaults, mp_from_config


def launcher_env(argv: list[str]) -> tuple[object, dict[str, str]]:
    """The environment `accelerate launch` would give the training processes, without launching them."""
    from accelerate.utils.launch import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    args, defaults, mp_from_config = validated_launch(argv)
    args.main_process_port = args.main_process_port or 0  # no port-in-use surprises in CI
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.use_fsdp or args.multi_gpu:
        env = prepare_multi_gpu_env(args)
    else:
        _, env = prepare_simple_launcher_cmd_env(args)
    return args, {k: v for k, v in env.items() if os.environ.get(k) != v}


@pytest.fixture
def bare_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith(("ACCELERATE_", "FSDP_")) or key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_every_strategy_has_a_config():
    assert {p.stem for p in CONFIGS} == set(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_parses_as_accelerate_reads_it(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(path))  # raises on unknown top-level keys
    assert isinstance(config, ClusterConfig)
    dist_type, per_machine, machines, _ = EXPECTED[path.stem]
    assert config.distributed_type.value == dist_type
    assert config.num_machines == machines
    assert config.num_processes == per_machine * machines


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_nested_keys_are_real_launch_options(path):
    """accelerate copies deepspeed_config / fsdp_config keys onto its args without checking: catch typos."""
    from accelerate.commands.launch import launch_command_parser

    dests = {a.dest for a in launch_command_parser()._actions}
    raw = yaml.safe_load(path.read_text())
    for section in ("deepspeed_config", "fsdp_config", "parallelism_config"):
        unknown = set(raw.get(section) or {}) - dests
        assert not unknown, f"{path.name}: {section} keys accelerate launch does not know: {sorted(unknown)}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_header_documents_its_launch_line(path):
    argv = launch_line(path)
    assert argv[:2] == ["--config_file", f"configs/accelerate/{path.name}"]
    assert argv[argv.index("-m") + 1] == "orpo_dist.train"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_launch_line_gives_the_intended_processes(path, bare_env):
    bare_env.chdir(ROOT)
    args, env = launcher_env(launch_line(path))
    dist_type, per_machine, machines, _ = EXPECTED[path.stem]
    assert args.num_processes == per_machine * machines
    assert args.module and args.training_script == "orpo_dist.train"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    if dist_type in ("MULTI_GPU", "FSDP", "DEEPSPEED"):
        assert int(args.nproc_per_node) == per_machine
    if machines > 1:
        # one torchrun per node meeting at the head node; not pdsh/ssh from the head node
        assert args.deepspeed_multinode_launcher == "standard"
        assert (args.nnodes, args.node_rank) == (str(machines), int(LINE_VARS["NODE_RANK"]))
        assert args.rdzv_endpoint == f"{LINE_VARS['MASTER_ADDR']}:29500"
        assert args.rdzv_backend == "c10d"


@pytest.mark.parametrize("path", [p for p in CONFIGS if EXPECTED[p.stem][3]], ids=lambda p: p.stem)
def test_deepspeed_plugin(path, bare_env):
    from accelerate.utils import DeepSpeedPlugin

    bare_env.chdir(ROOT)
    _, env = launcher_env(launch_line(path))
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    # the trainer owns accumulation and clipping (it writes them into the DeepSpeed config); a value
    # from the launcher would override --gradient_accumulation through ACCELERATE_GRADIENT_ACCUMULATION_STEPS
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env and "ACCELERATE_GRADIENT_CLIPPING" not in env
    for key, value in env.items():
        bare_env.setenv(key, value)
    plugin = DeepSpeedPlugin()
    for key, value in EXPECTED[path.stem][3].items():
        assert getattr(plugin, key) == value, key
    zero = plugin.deepspeed_config["zero_optimization"]
    assert zero["stage"] == EXPECTED[path.stem][3]["zero_stage"]
    assert zero["offload_optimizer"]["device"] == EXPECTED[path.stem][3]["offload_optimizer_device"]
    assert zero["offload_param"]["device"] == EXPECTED[path.stem][3]["offload_param_device"]
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"


def test_zero3_sp_sets_the_sequence_parallel_size(bare_env):
    """The launcher hands the size to the trainer, which adopts it (and checks the launch against it)."""
    from orpo_dist.config import load_config
    from orpo_dist.sequence_parallel import resolve

    bare_env.chdir(ROOT)
    _, env = launcher_env(launch_line(CONFIG_DIR / "zero3_sp.yaml"))
    assert env["ACCELERATE_USE_PARALLELISM_CONFIG"] == "true"
    assert (env["PARALLELISM_CONFIG_SP_SIZE"], env["PARALLELISM_CONFIG_SP_BACKEND"]) == ("8", "deepspeed")
    cfg = load_config(TINY_YAML)
    assert resolve(cfg, {**env, "WORLD_SIZE": "8"}) == 8 and cfg.train.sequence_parallel_size == 8


def test_fsdp2_plugin(bare_env):
    """The plugin the FSDP2 config asks for (tests/test_fsdp2.py trains with it on CPU ranks)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    bare_env.chdir(ROOT)
    _, env = launcher_env(launch_line(CONFIG_DIR / "fsdp2.yaml"))
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    for key, value in env.items():
        bare_env.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True
    assert plugin.cpu_ram_efficient_loading is True
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert plugin.auto_wrap_policy is not None


# ------------------------------------------------------------------------------------------ launchers


def run(
    cmd: list[str], env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_syntax_and_help(path):
    assert os.access(path, os.X_OK), f"{path} is not executable"
    assert run(["bash", "-n", str(path)]).returncode == 0
    out = run(["bash", str(path), "--help"])
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) >= 3 and "#" not in out.stdout.splitlines()[0]


def test_slurm_script_outside_a_job_says_so():
    out = run(["bash", "slurm/orpo.sh", str(TINY_YAML)], env={"SLURM_JOB_ID": ""})
    assert out.returncode == 2 and "sbatch" in out.stderr


def dry(script: str, **env: str) -> str:
    out = run(["bash", script, "--lr", "1e-5"], env={"DRY_RUN": "1", "PYTHON": "python", **env})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_single_node_command():
    cmd = dry(
        "launch/single_node.sh",
        NUM_PROCESSES="4",
        CONFIG="my.yaml",
        ACCEL_CONFIG="configs/accelerate/zero2.yaml",
    )
    assert cmd == (
        "python -m accelerate.commands.launch --config_file configs/accelerate/zero2.yaml "
        "--num_processes 4 -m orpo_dist.train --config my.yaml --lr 1e-5"
    )


@pytest.mark.parametrize(
    "config, cpu_env",
    [
        ("multi_gpu", "ACCELERATE_USE_CPU=true "),
        ("single_gpu", "ACCELERATE_USE_CPU=true "),
        ("zero3", ""),
        ("fsdp2", ""),
    ],
)
def test_cpu_mode_connects_ranks(config, cpu_env):
    """DDP needs ACCELERATE_USE_CPU; DeepSpeed and FSDP must not get it (accelerate would quietly run
    plain DDP)."""
    cmd = dry(
        "launch/single_node.sh",
        ORPO_CPU="1",
        NUM_PROCESSES="2",
        ACCEL_CONFIG=f"configs/accelerate/{config}.yaml",
    )
    assert cmd.startswith(cpu_env + "python -m accelerate.commands.launch")
    assert "--mixed_precision no" in cmd and "--cpu" not in cmd.split()


def test_multi_node_accelerate_command():
    cmd = dry(
        "launch/multi_node_accelerate.sh",
        NNODES="2",
        NODE_RANK="1",
        MASTER_ADDR="node0",
        MASTER_PORT="1234",
        GPUS_PER_NODE="4",
    ).split()
    opt = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--")}
    assert opt["--num_machines"] == "2" and opt["--machine_rank"] == "1"
    assert opt["--num_processes"] == "8"  # total over nodes, as accelerate wants
    assert opt["--main_process_ip"] == "node0" and opt["--main_process_port"] == "1234"
    assert opt["--rdzv_backend"] == "c10d" and opt["--deepspeed_multinode_launcher"] == "standard"
    assert opt["--config_file"].endswith("configs/accelerate/zero3.yaml")
    # and accelerate accepts it
    args, _, _ = validated_launch(cmd[3:])
    assert (args.num_machines, args.machine_rank, args.num_processes) == (2, 1, 8)


def test_multi_node_torchrun_command():
    cmd = dry("launch/multi_node_torchrun.sh", NNODES="3", MASTER_ADDR="node0", GPUS_PER_NODE="8")
    assert cmd == (
        "python -m torch.distributed.run --nnodes 3 --nproc_per_node 8 --rdzv_backend c10d "
        "--rdzv_endpoint node0:29500 --rdzv_id orpo -m orpo_dist.train --lr 1e-5"
    )


# Real 2-process CPU runs, one per launcher (~15-25 s each).
REAL_RUNS = {
    "single_node_ddp": ("launch/single_node.sh", {"NUM_PROCESSES": "2"}, "MULTI_CPU"),
    "multi_node_accelerate_zero3": ("launch/multi_node_accelerate.sh", {"GPUS_PER_NODE": "2"}, "DEEPSPEED"),
    "multi_node_torchrun": ("launch/multi_node_torchrun.sh", {"GPUS_PER_NODE": "2"}, "MULTI_CPU"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", REAL_RUNS)
def test_launcher_trains_with_two_connected_ranks(name, tmp_path):
    script, env, dist_type = REAL_RUNS[name]
    port = str(20000 + os.getpid() % 10000 + list(REAL_RUNS).index(name))
    env = {
        **env,
        "ORPO_CPU": "1",
        "PYTHON": sys.executable,
        "CONFIG": str(TINY_YAML),
        "MASTER_PORT": port,
        **OFFLINE_ENV,
    }
    out = run(
        ["bash", script, "--output_dir", str(tmp_path), "--max_steps", "3", "--eval_split", "0"],
        env=env,
        timeout=300,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert f"world_size=2 distributed={dist_type}" in log, log[-3000:]
    assert (tmp_path / "final" / "orpo_config.yaml").exists()
