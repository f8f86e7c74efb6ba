"""slurm/train.sbatch: its dry run (plain bash, fake SLURM_* variables) and a real job on a one-node Slurm cluster.

The cluster tests are opt-in (`make test-slurm`, marker `slurm`): they start munged, slurmctld and slurmd on
localhost (tests/slurm_cluster.py), submit the script with a tiny recipe on 1 node x 2 CPU ranks, and check
that the run directory equals the one `deepspeed --num_gpus 2` makes. The dry-run tests need only bash.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cl_scale.rundir import IN_PROGRESS, TRAIN_LOG
from tests.slurm_cluster import FINISHED, SlurmCluster, missing_reason, slurm_cluster
from tests.trainer_helpers import REPO, launch, train_log, wait_until, write_recipe

SCRIPT = REPO / "slurm" / "train.sbatch"
TASKS = ["reverse", "sort"]  # write_recipe's tasks
EVERY = 2
STEPS_TWO = 32 // 16 * 8  # task 2: 32 examples, global batch 16, 8 epochs
VENV_BIN = str(Path(sys.executable).parent)

# Expands Slurm host lists like gpu[01-02,05],login1 the way `scontrol show hostnames` does.
FAKE_SCONTROL = f"""#!{sys.executable}
import re, sys
if sys.argv[1:3] != ["show", "hostnames"]:
    sys.exit("fake scontrol: only `show hostnames` is supported")
for prefix, ranges in re.findall(r"([^,\\[]+)(?:\\[([^\\]]*)\\])?", sys.argv[3]):
    if not ranges:
        print(prefix)
        continue
    for part in ranges.split(","):
        first, _, last = part.partition("-")
        for number in range(int(first), int(last or first) + 1):
            print(f"{{prefix}}{{number:0{{len(first)}}d}}")
"""


# --------------------------------------------------------------------------------------------------
# Dry run: no Slurm needed


@pytest.fixture()
def dry(tmp_path: Path, tiny_recipe_file: Path):
    """Run the script with bash, DRY_RUN=1 and fake SLURM_* variables; returns (completed, srun words, node words)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    workdir = tmp_path / "submit"
    workdir.mkdir()

    def run(*args: str, **env: str):
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
            "PATH": os.pathsep.join([str(bin_dir), VENV_BIN, os.environ.get("PATH", "")]),
            "DRY_RUN": "1",
            "SLURM_JOB_ID": "123456",
            "SLURM_JOB_NAME": "cl-scale",
            "SLURM_JOB_NODELIST": "gpu[01-02]",
            "SLURM_CPUS_PER_TASK": "32",
            **env,
        }
        full_env = {k: v for k, v in full_env.items() if v is not None}
        result = subprocess.run(["bash", str(SCRIPT), *args], cwd=workdir, env=full_env, capture_output=True,
                                text=True, timeout=120)
        srun = next((line for line in result.stdout.splitlines() if line.startswith("srun ")), None)
        srun_words = shlex.split(srun) if srun else []
        node_words = shlex.split(srun_words[-1]) if srun_words else []
        return result, srun_words, node_words

    run.workdir = workdir
    return run


@pytest.fixture()
def tiny_recipe_file(tmp_path: Path) -> Path:
    """A recipe that only needs to resolve (the dry run never loads the model)."""
    return write_recipe(tmp_path / "tiny.yaml", tmp_path / "no-model-needed")


def _option(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


def test_sbatch_lines_hold_no_shell_variables_and_ask_for_a_requeueable_gpu_job() -> None:
    lines = [line for line in SCRIPT.read_text().splitlines() if line.startswith("#SBATCH")]
    assert lines and not [line for line in lines if "$" in line or "`" in line]
    options = " ".join(lines)
    for expected in ("--nodes=1", "--ntasks-per-node=1", "--gres=gpu:8", "--cpus-per-task=", "--time=",
                     "--requeue", "--output=logs/%x-%j.out", "--open-mode=append"):
        assert expected in options
    # sbatch stops reading #SBATCH lines at the first command: all of them come before it.
    body = [i for i, line in enumerate(SCRIPT.read_text().splitlines()) if line and not line.startswith("#")]
    assert max(i for i, line in enumerate(SCRIPT.read_text().splitlines()) if line.startswith("#SBATCH")) < body[0]


def test_dry_run_prints_hostfile_master_and_the_per_node_launch(dry, tiny_recipe_file: Path) -> None:
    result, srun, node = dry(str(tiny_recipe_file), "train.lr=1e-4", "--set", "data.template=it's {input} x")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "cat > logs/cl-scale-123456.hostfile <<'EOF'\ngpu01 slots=8\ngpu02 slots=8\nEOF\n" in out
    port = 10000 + 123456 % 20000
    assert f"export MASTER_ADDR=gpu01 MASTER_PORT={port}" in out
    assert "starts runs/tiny (no manifest yet)" in out
    # srun: one launcher per node, a log per node, the CPUs of the job step passed on explicitly.
    assert srun[0] == "srun" and srun[-2:-1] == ["-c"] and srun[-3] == "bash"
    for expected in ("--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--output=logs/%x-%j-%N.out",
                     "--cpus-per-task=32", "--kill-on-bad-exit=1"):
        assert expected in srun
    # The node command: deepspeed with the hostfile, no ssh, Slurm's node id as node rank.
    assert node[0] == "exec" and node[1] == str(Path(VENV_BIN) / "deepspeed")
    assert _option(node, "--hostfile") == "logs/cl-scale-123456.hostfile" and "--no_ssh" in node
    assert _option(node, "--node_rank") == "$SLURM_NODEID"
    assert _option(node, "--num_nodes") == "2" and _option(node, "--num_gpus") == "8"
    assert _option(node, "--master_addr") == "gpu01" and _option(node, "--master_port") == str(port)
    train = node[node.index(str(Path(VENV_BIN) / "cl-scale")):]
    assert train == [str(Path(VENV_BIN) / "cl-scale"), "train", str(tiny_recipe_file), "--run-dir", "runs/tiny",
                     "train.lr=1e-4", "--set", "data.template=it's {input} x"]
    # Nothing was run or written.
    assert not (dry.workdir / "logs").exists()


def test_dry_run_resumes_when_the_run_directory_has_a_manifest(dry, tiny_recipe_file: Path) -> None:
    run_dir = dry.workdir / "elsewhere" / "my-run"
    run_dir.mkdir(parents=True)
    _, _, fresh = dry(str(tiny_recipe_file), RUN_DIR=str(run_dir))
    assert "--resume" not in fresh and _option(fresh, "--run-dir") == str(run_dir)
    (run_dir / "manifest.json").write_text("{}")
    result, _, again = dry(str(tiny_recipe_file), RUN_DIR=str(run_dir), SLURM_RESTART_COUNT="1")
    assert "--resume" in again and _option(again, "--run-dir") == str(run_dir)
    assert "restart 1" in result.stdout and f"resumes {run_dir} (its manifest exists)" in result.stdout


def test_dry_run_run_directory_follows_the_recipe_overrides(dry, tiny_recipe_file: Path) -> None:
    _, _, node = dry(str(tiny_recipe_file), "name=other", "--set", "output.dir=out/x")
    assert _option(node, "--run-dir") == "out/x/other"


def test_dry_run_gpus_per_node_and_port_from_the_environment(dry, tiny_recipe_file: Path) -> None:
    result, srun, node = dry(str(tiny_recipe_file), GPUS_PER_NODE="2", MASTER_PORT="29999",
                             SLURM_JOB_NODELIST="vm", SLURM_CPUS_PER_TASK=None)
    assert "vm slots=2\nEOF" in result.stdout
    assert _option(node, "--num_gpus") == "2" and _option(node, "--num_nodes") == "1"
    assert _option(node, "--master_port") == "29999" and "--nodes=1" in srun
    assert not [w for w in srun if w.startswith("--cpus-per-task")]


def test_refuses_run_dir_and_resume_arguments_and_runs_only_inside_a_job(dry, tiny_recipe_file: Path) -> None:
    for bad in ("--resume", "--run-dir"):
        result, _, _ = dry(str(tiny_recipe_file), bad, "x")
        assert result.returncode == 2 and bad in result.stderr
    result, _, _ = dry(str(tiny_recipe_file), SLURM_JOB_ID=None)
    assert result.returncode == 2 and "SLURM_JOB_ID" in result.stderr
    result, _, _ = dry()
    assert result.returncode == 2 and "sbatch" in result.stderr


# --------------------------------------------------------------------------------------------------
# A real job on a real (one-node) Slurm cluster


@pytest.fixture(scope="module")
def cluster():
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    with slurm_cluster() as started:
        yield started


def _job_logs(workdir: Path) -> str:
    paths = sorted((workdir / "logs").glob("*.out"))
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-6000:]}" for p in paths)


def _compare_runs(direct: Path, slurm: Path) -> None:
    one, two = (json.loads((run / "manifest.json").read_text()) for run in (direct, slurm))
    assert [(s["index"], s["task"]) for s in two["stages"]] == [(s["index"], s["task"]) for s in one["stages"]]
    assert len(one["stages"]) == len(one["tasks"]) == 2
    assert two["world_size"] == one["world_size"] == 2
    stages = sorted(p.name for p in (direct / "stages").iterdir())
    assert sorted(p.name for p in (slurm / "stages").iterdir()) == stages
    for stage in stages:
        a, b = train_log(direct, stage), train_log(slurm, stage)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            terms = [k for k in x if k.startswith("loss")]
            assert terms and terms == [k for k in y if k.startswith("loss")]
            for key in terms:
                assert y[key] == pytest.approx(x[key], rel=1e-6, abs=1e-6), (stage, x.get("step"), key)
        for name in ("snapshot.safetensors", "method.safetensors"):
            if not (direct / "stages" / stage / name).exists():
                continue
            s1, s2 = load_file(str(direct / "stages" / stage / name)), load_file(str(slurm / "stages" / stage / name))
            assert s1.keys() == s2.keys() and s1
            for key in s1:
                torch.testing.assert_close(s2[key], s1[key], rtol=1e-6, atol=1e-6, msg=f"{stage}/{name} {key}")


def _finished_stages(run_dir: Path) -> int:
    try:
        return len(json.loads((run_dir / "manifest.json").read_text())["stages"])
    except (OSError, ValueError, KeyError):
        return 0


def _live_steps(run_dir: Path, stage: str) -> int:
    path = run_dir / IN_PROGRESS / stage / TRAIN_LOG
    return len(path.read_text().splitlines()) if path.is_file() else 0


@pytest.mark.slurm
def test_sbatch_job_requeued_inside_a_task_resumes_from_its_checkpoint_and_matches_deepspeed_launch(
    cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path
) -> None:
    """1 node x 2 CPU ranks; in the middle of task 2 the job gets USR1 (as before its time limit) and requeues
    itself; Slurm's SIGTERM makes the ranks checkpoint their step; the restarted job resumes from that
    checkpoint, and the finished run equals an uninterrupted `deepspeed --num_gpus 2` launch."""
    root = tmp_path_factory.mktemp("slurm_job")
    recipe = write_recipe(root / "tiny.yaml", tiny_llama_dir,
                          train={"epochs_per_task": {"sort": 8}, "checkpoint_every_steps": EVERY})
    direct = root / "direct"
    launch([(recipe, direct)], ranks=2, cache=root / "cache-direct")

    workdir = root / "submit"
    (workdir / "logs").mkdir(parents=True)
    run_dir = workdir / "runs" / "tiny"
    env = {
        "PATH": os.pathsep.join([VENV_BIN, os.environ.get("PATH", "")]),
        "CL_SCALE_CACHE": str(root / "cache-slurm"),
        "GPUS_PER_NODE": "2",
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    # No GPUs on this cluster: the script's --gres=gpu:8 (and its CPU count) are replaced on the command line.
    job = cluster.sbatch(["--export=ALL", "--gres=none", f"--cpus-per-task={cluster.cpus}", "--job-name=cl-scale-test",
                          str(SCRIPT), str(recipe)], cwd=workdir, env=env)

    def check(ok: bool, fields: dict[str, str]) -> None:
        assert ok, f"{fields}\n{_job_logs(workdir)}\n{cluster.logs()}"

    stage_two = f"02-{TASKS[1]}"
    wait_until(lambda: _live_steps(run_dir, stage_two) > EVERY or cluster.job(job).get("JobState") in FINISHED,
               what="task 2 past its first checkpoint", timeout=900)
    check(_finished_stages(run_dir) == 1 and _live_steps(run_dir, stage_two) < STEPS_TWO, cluster.job(job))
    # What Slurm does ten minutes before the time limit (--signal=B:USR1@600): the script requeues the job.
    cluster.command("scancel", "--batch", "--signal=USR1", job)
    fields = cluster.wait(job, timeout=120, until=lambda f: f.get("Restarts") == "1")
    cluster.release_now(job)
    fields = cluster.wait(job, timeout=900)
    check(fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0" and fields["Restarts"] == "1", fields)

    logs = _job_logs(workdir)
    # One log for the batch script (appended across restarts), one per node; the hostfile names this host.
    assert (workdir / "logs" / f"cl-scale-test-{job}.out").is_file()
    assert (workdir / "logs" / f"cl-scale-test-{job}-{cluster.node}.out").is_file()
    assert (workdir / "logs" / f"cl-scale-test-{job}.hostfile").read_text() == f"{cluster.node} slots=2\n"
    assert "restart 0" in logs and "starts runs/tiny (no manifest yet)" in logs
    assert "USR1 (time limit near): requeueing" in logs
    assert "restart 1" in logs and "resumes runs/tiny (its manifest exists)" in logs
    sessions = json.loads((run_dir / "manifest.json").read_text())["sessions"]
    assert len(sessions) == 2
    resumed = sessions[-1]["resumed_from"]
    assert resumed["index"] == 1 and resumed["task"] == TASKS[1] and EVERY <= resumed["step"] < STEPS_TWO, resumed
    assert not (run_dir / IN_PROGRESS).exists()
    _compare_runs(direct, run_dir)
