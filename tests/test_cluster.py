"""cluster/: the YAMLs pass Ray's own validation (and AWS bootstrap against moto), the KubeRay manifests read as Ray
reads them, the README's job commands parse, and the stages run as Ray jobs on a `ray start --head` cluster."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from helpers import wait_for
from raylm.ray_session import free_port
from trainer.job import JobConfig

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
TINY_TRAIN = ["--config", "configs/tiny.toml", "--train.global_batch=8", "--train.micro_batch=4",
              "--train.sample_prompt=", "--train.eval_rows=16", "--checkpoint.every=0"]


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def node_types(config: dict) -> dict:
    return config["available_node_types"]


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cluster_yaml_passes_rays_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(load(name))
    validate_config(config)
    types = node_types(config)
    assert set(types) == {"head", "cpu-worker", "gpu-worker"} and config["head_node_type"] == "head"
    assert types["gpu-worker"]["min_workers"] == 0 < types["gpu-worker"]["max_workers"]
    assert types["cpu-worker"]["min_workers"] == 0 < types["cpu-worker"]["max_workers"]
    assert 0 < config["idle_timeout_minutes"] <= 30
    assert "pip install -q -e /home/ubuntu/raylm" in " ".join(config["setup_commands"])
    text = (CLUSTER / name).read_text()
    assert "YOUR-BUCKET" in text and not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|private_key", text, re.I)


BOOTSTRAP = """
import json, sys, types, boto3, yaml
from moto import mock_aws
from ray.autoscaler._private.aws import config as aws_config
from ray.autoscaler._private.commands import _bootstrap_config

aws_config.time = types.SimpleNamespace(sleep=lambda seconds: None)  # its 2 x 15 s waits for IAM to propagate
with mock_aws():
    config = _bootstrap_config(yaml.safe_load(open(sys.argv[1])), no_config_cache=True)
    iam = boto3.client("iam", region_name="us-west-2")
    profile = config["head_node"]["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1]
    role = iam.get_instance_profile(InstanceProfileName=profile)["InstanceProfile"]["Roles"][0]["RoleName"]
    policies = [p["PolicyArn"] for p in iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"]]
print(json.dumps({"config": config, "profile": profile, "policies": policies}))
"""


def test_aws_yaml_bootstraps_against_moto(mocked_aws_env):
    """Ray's own AWS bootstrap (IAM role, key pair, subnets, security group, AMI) against moto's mocked AWS, in a
    process of its own: leaving `mock_aws()` resets every moto backend, the session's S3 server's buckets too. Its
    sleeps for real AWS's IAM propagation (the only use of `time` in Ray's aws/config.py) are skipped: moto's IAM is
    consistent at once."""
    proc = subprocess.run([sys.executable, "-c", BOOTSTRAP, str(CLUSTER / "aws.yaml")], env=mocked_aws_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    config, profile = out["config"], out["profile"]
    assert "arn:aws:iam::aws:policy/AmazonS3FullAccess" in out["policies"]
    for name, node_type in node_types(config).items():
        node = node_type["node_config"]
        assert node["SubnetIds"] and node["SecurityGroupIds"] and node["KeyName"], name
        assert node["ImageId"] == "YOUR-DLAMI", name  # set on every type: Ray's default AMI is CUDA 11
        if name != "head":  # workers reach S3 with the instance profile the bootstrap created for the head
            assert node["IamInstanceProfile"] == {"Name": profile}, name
    assert Path(config["auth"]["ssh_private_key"]).is_file()


def test_kuberay_raycluster_reads_as_ray_reads_it():
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
    from ray.autoscaler._private.util import validate_config

    cluster = load("kuberay/raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    config = _derive_autoscaling_config_from_ray_cr(cluster)
    validate_config(config)
    types = node_types(config)
    assert types["gpu-worker"]["resources"]["GPU"] == 8 and types["gpu-worker"]["min_workers"] == 0
    assert types["cpu-worker"]["min_workers"] == 0 and types["cpu-worker"]["resources"]["CPU"] > 0
    assert types["headgroup"]["resources"]["CPU"] == 0
    assert config["idle_timeout_minutes"] == 10


def test_kuberay_gpu_workers_pass_a_preemption_notice_to_the_training_workers(tmp_path):
    """The gpu-worker pods' preStop hook SIGTERMs the Ray Train workers and waits for them (as a real shell runs it,
    against a stand-in process), within a termination grace period that leaves room for the save."""
    from trainer.checkpoint import CheckpointConfig

    groups = load("kuberay/raycluster.yaml")["spec"]["workerGroupSpecs"]
    spec = next(g for g in groups if g["groupName"] == "gpu-worker")
    pod = spec["template"]["spec"]
    hook = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert pod["terminationGracePeriodSeconds"] > CheckpointConfig().preempt_grace_s + 10
    name = f"StandInWorker{os.getpid()}"  # not the pattern itself: a real worker of another test may be running
    ready, marker = tmp_path / "ready", tmp_path / "saved"
    stand_in = subprocess.Popen([sys.executable, "-c", STAND_IN, str(ready), str(marker), name])
    wait_for("the stand-in's SIGTERM handler", ready.exists, stand_in, timeout=60, every=0.05)
    # The hook polls once a second for 30 s while a worker lives: it returns within 15 s only if it stops polling
    # once the worker is gone, and by then the worker (whose save takes 1.5 s) has saved and exited.
    subprocess.run([part.replace("[R]ayTrainWorker", f"[{name[0]}]{name[1:]}") for part in hook], check=True,
                   timeout=15)
    assert stand_in.poll() == 0 and marker.read_text() == "saved", "the hook returned before the save was done"


STAND_IN = """
import signal, sys, time
def save(*_):
    time.sleep(1.5)
    open(sys.argv[2], "w").write("saved")
    sys.exit(0)
signal.signal(signal.SIGTERM, save)
open(sys.argv[1], "w").close()
time.sleep(60)
"""
"""A training worker that saves for 1.5 s on SIGTERM; argv: its ready marker, its saved marker, a name."""


def test_kuberay_rayjob_targets_the_cluster_and_its_entrypoint_parses(monkeypatch):
    from raylm.cli import parse_job_args
    from trainer.__main__ import FLAGS

    monkeypatch.chdir(ROOT)  # the image's working directory is a checkout
    job, cluster = load("kuberay/rayjob.yaml"), load("kuberay/raycluster.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    # a job on a shared cluster never deletes it: KubeRay refuses a TTL there, and backoffLimit retries delete it
    assert job["spec"]["shutdownAfterJobFinishes"] is False
    assert "ttlSecondsAfterFinished" not in job["spec"] and "backoffLimit" not in job["spec"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "trainer"]
    parsed, _ = parse_job_args(argv[3:], prog="python -m trainer", description="", flags=FLAGS, root=JobConfig)
    assert parsed.ray.use_gpu and parsed.ray.num_workers == 16 and parsed.parallel.mixed_precision == "bf16"
    assert_batch_fits(parsed, parsed.train.global_batch)


def assert_batch_fits(job, global_batch: int) -> None:
    """The launch check the trainer runs before starting workers: every worker gets a share of the batch."""
    from trainer.data import BatchPlan

    BatchPlan(global_batch=global_batch, micro_batch=job.train.micro_batch, world=job.ray.num_workers)


def readme_jobs() -> list[list[str]]:
    """Every `ray job submit … -- python -m X …` command of cluster/README.md, as the argv after `--`."""
    text = (CLUSTER / "README.md").read_text()
    return [shlex.split(m) for m in re.findall(r"^ray job submit --working-dir \. -- (.+)$", text, re.M)]


def test_cluster_readme_job_commands_parse(monkeypatch):
    from dataprep.__main__ import parse_args
    from raylm.cli import parse_job_args
    from trainer.__main__ import FLAGS
    from tune.config import TuneJobConfig

    monkeypatch.chdir(ROOT)  # jobs run in the uploaded working directory
    jobs = {argv[2]: argv[3:] for argv in readme_jobs()}
    assert sorted(jobs) == ["dataprep", "trainer", "tune"]
    parse_args(jobs["dataprep"])
    train, _ = parse_job_args(jobs["trainer"], prog="trainer", description="", flags=FLAGS, root=JobConfig)
    assert train.ray.use_gpu and train.run.dir.startswith("s3://")
    assert_batch_fits(train, train.train.global_batch)
    study, _ = parse_job_args(jobs["tune"], prog="tune", description="", root=TuneJobConfig)
    assert study.tune.max_concurrent == 2 and study.tune.dir.startswith("s3://")
    for batch in study.tune.batch:
        assert_batch_fits(study, batch)
    train_line = next(l for l in (CLUSTER / "README.md").read_text().splitlines() if "-- python -m trainer" in l)
    assert train_line in (ROOT / "README.md").read_text()  # the main README quotes the same command
    for path in re.findall(r"(cluster/[\w./-]+\.(?:yaml|py)|configs/\w+\.toml)", (CLUSTER / "README.md").read_text()):
        assert (ROOT / path).exists(), path


DASHBOARD = CLUSTER / "grafana" / "raylm.json"


def dashboard_metrics() -> set[str]:
    """The metrics raylm's Grafana dashboard plots."""
    exprs = [t["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for t in panel["targets"]]
    return {name for expr in exprs for name in re.findall(r"\bray_raylm_\w+", expr)}


def test_grafana_dashboard_plots_every_raylm_gauge_by_job_and_run():
    """Loadable as Ray's own dashboards are (a provisioned JSON file with a Prometheus datasource variable); one
    curve per job and run, selectable by both."""
    from trainer.metrics import GAUGES

    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 27
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus" and {"job", "run"} <= set(variables)
    assert dashboard_metrics() == {f"ray_{name}" for name in GAUGES.values()}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            assert 'job=~"$job", run=~"$run"' in target["expr"] and "by (job, run)" in target["expr"], target
            assert target["legendFormat"] == "{{run}} ({{job}})" and panel["datasource"] == "${datasource}"


# ----------------------------------------------------------------------------------- a real `ray start --head`
class Head:
    """`ray start --head --block` on free ports with its own temp dir, in its own process group, so the test stops
    exactly the cluster it started (`ray stop` would stop every Ray on the machine)."""

    def __init__(self, tmp: Path):
        self.dashboard, self.metrics = free_port(), free_port()
        bin_dir = os.path.dirname(sys.executable)  # as a user with raylm's environment activated
        self.env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
                    "RAY_ADDRESS": f"http://127.0.0.1:{self.dashboard}", "RAY_metrics_report_interval_ms": "1000"}
        self.proc = subprocess.Popen(
            [os.path.join(bin_dir, "ray"), "start", "--head", "--block", "--num-cpus=2", "--disable-usage-stats",
             f"--port={free_port()}", f"--dashboard-port={self.dashboard}", f"--metrics-export-port={self.metrics}",
             f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
             "--dashboard-host=127.0.0.1", f"--temp-dir={tmp}"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.wait_until_up()

    def wait_until_up(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.dashboard}/api/version", timeout=2)
                return
            except OSError:
                assert self.proc.poll() is None, "ray start --head exited"
                time.sleep(1)
        raise AssertionError("the head's dashboard did not come up")

    def submit(self, *argv: str, wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
        """`ray job submit --working-dir . -- ARGV`, run from the repository root as the README says."""
        cmd = ["ray", "job", "submit", "--working-dir", ".", "--", *argv]
        if wait:
            return subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=600)
        return subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.env["RAY_ADDRESS"])

    def job_logs(self, job_id: str) -> str:
        return self.client().get_job_logs(job_id)

    def raylm_gauges(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=5) as response:
            return "\n".join(l for l in response.read().decode().splitlines() if l.startswith("ray_raylm_"))

    def stop(self) -> None:
        """Every process of this cluster (GCS, raylet, dashboard, workers) is in the head's process group."""
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=grace)
                return
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue


@pytest.fixture
def head(tmp_path_factory):
    head = Head(Path(tmp_path_factory.mktemp("ray-head")))
    yield head
    head.stop()


def job_statuses(head: Head) -> dict:
    """submission id -> (status, entrypoint) of every job the head ran."""
    return {j.submission_id: (j.status.value, j.entrypoint) for j in head.client().list_jobs()}


def test_stages_run_as_ray_jobs_with_metrics_on_the_heads_endpoint(head, tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    prep = head.submit("python", "-m", "dataprep", "--max-files", "60", "--vocab-size", "500", "--seq-len", "64",
                       "--val-fraction", "0.05", "--output", str(data))  # validation rows: the val_loss gauge
    assert prep.returncode == 0, prep.stdout[-3000:] + prep.stderr[-3000:]
    assert "succeeded" in prep.stdout and "dataset:" in prep.stdout

    train = head.submit("python", "-m", "trainer", *TINY_TRAIN, "--train.steps=100", "--train.log_every=10",
                        "--train.eval_every=50", "--data.path", str(data), "--run.dir", str(run), wait=False)
    served, wanted = {}, dashboard_metrics()  # metric -> its line, from any scrape while the run lives
    while train.poll() is None and set(served) != wanted:  # val_loss from the step-0 evaluation on, the rest at step 10
        time.sleep(1)
        served |= {line.split("{", 1)[0]: line for line in head.raylm_gauges().splitlines()}
    out, _ = train.communicate(timeout=600)
    assert train.returncode == 0, out[-3000:]
    for name in wanted:  # each with the labels the dashboard selects by
        assert 'job="' in served.get(name, "") and f'run="{run}"' in served[name], f"{name} not served: {served}"
    assert re.search(r"step +100 \| loss", out) and "finished; config, metrics.jsonl" in out

    bad = head.submit("python", "-m", "trainer", *TINY_TRAIN, "--optim.lr=abc", "--data.path", str(data))
    assert bad.returncode != 0 and "failed" in bad.stderr + bad.stdout
    lost = head.submit("python", "-m", "trainer", *TINY_TRAIN, "--data.path", str(data), "--run.dir", "runs/job1")
    assert lost.returncode != 0  # it would have written into Ray's copy of the working directory, and lost it
    jobs = job_statuses(head)
    assert sorted(status for status, _ in jobs.values()) == ["FAILED", "FAILED", "SUCCEEDED", "SUCCEEDED"], jobs
    errors = {entrypoint: [l for l in head.job_logs(job_id).splitlines() if l.startswith("error:") or "Traceback" in l]
              for job_id, (status, entrypoint) in jobs.items() if status == "FAILED"}
    assert errors.pop(next(e for e in errors if "abc" in e)) == ["error: --optim.lr='abc' is not a valid float"]
    [relative] = errors.values()
    assert len(relative) == 1 and relative[0].startswith("error: --run.dir runs/job1 is a relative path: the command "
                                                         "runs in Ray's copy of this job's working directory ("), relative
    assert "/runtime_resources/working_dir_files/_ray_pkg_" in relative[0], relative
