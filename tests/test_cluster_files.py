"""Static checks of the deployment files in cluster/ (no Ray cluster is started).

* ray-cluster.yaml: valid for `ray up` (Ray's own JSON schema and validator),
  a CPU head and autoscaled GPU workers that install torch and nyxray.
* rayjob.yaml: a KubeRay RayJob running nyxray on GPU workers, with its recipe
  in a ConfigMap and credentials taken from a Secret, never inlined.
* submit.sh: syntax, --help without a cluster, and the `ray job submit` call it
  makes (against a stub `ray`), including how credentials are passed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
LAUNCHER = CLUSTER / "ray-cluster.yaml"
RAYJOB = CLUSTER / "rayjob.yaml"
SUBMIT = CLUSTER / "submit.sh"

GPU_INSTANCE = re.compile(r"^(g4dn|g5|g5g|g6|g6e|gr6|p3|p3dn|p4d|p4de|p5|p5e|p5en)\.")
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.I)


def _launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def _rayjob_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]


def _rayjob() -> dict:
    (job,) = [d for d in _rayjob_docs() if d.get("kind") == "RayJob"]
    return job


def _ray_schema_path() -> Path | None:
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "autoscaler" / "ray-schema.json"
        if path.is_file():
            return path
    return None


def _pinned_ray_version(config: dict) -> str:
    script = "\n".join(config["setup_commands"])
    m = re.search(r"ray\[default\]==([0-9][0-9A-Za-z.]*)", script)
    assert m, "setup_commands must pin ray[default]==X.Y.Z"
    return m.group(1)


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _all_pod_templates(job: dict) -> list[dict]:
    spec = job["spec"]["rayClusterSpec"]
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


# --------------------------------------------------------------------------
# ray-cluster.yaml


def test_launcher_matches_ray_schema():
    config = _launcher()
    schema_path = _ray_schema_path()
    jsonschema = pytest.importorskip("jsonschema") if schema_path else None
    if schema_path is None:
        # No Ray here: check at least the fields `ray up` requires.
        for field in ("cluster_name", "provider", "available_node_types", "head_node_type"):
            assert field in config, field
        for node_type in config["available_node_types"].values():
            assert {"resources", "node_config"} <= set(node_type)
        return
    jsonschema.validate(config, json.loads(schema_path.read_text()))


def test_launcher_passes_rays_own_validation():
    pytest.importorskip("jsonschema")
    util = pytest.importorskip("ray.autoscaler._private.util")
    # What `ray up` does before any cloud call: merge with the provider's
    # defaults, then validate (schema, head type, min/max workers).
    merged = util.fillout_defaults(_launcher())
    util.validate_config(merged)


def test_launcher_cpu_head_and_autoscaled_gpu_workers():
    config = _launcher()
    assert config["provider"]["type"] == "aws"
    assert config["provider"]["region"]
    assert "docker" not in config or not config["docker"], "the launcher config is docker-free"

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert not GPU_INSTANCE.match(head["node_config"]["InstanceType"]), "head is a CPU node"
    assert head["resources"].get("CPU") == 0, "no merge actors on the head"

    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    gpu_workers = {k: v for k, v in workers.items() if GPU_INSTANCE.match(v["node_config"]["InstanceType"])}
    assert gpu_workers, "at least one GPU worker node type"
    for name, node_type in gpu_workers.items():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"], name
        assert node_type["max_workers"] > 0, name
        assert node_type["max_workers"] <= config["max_workers"], name
        # S3 access on the workers comes from an instance profile.
        profile = node_type["node_config"]["IamInstanceProfile"]
        assert profile.get("Name") or profile.get("Arn"), name
        # Same image everywhere, so the Python version matches the head's.
        assert node_type["node_config"]["ImageId"] == head["node_config"]["ImageId"], name
    assert config["idle_timeout_minutes"] > 0


def test_launcher_setup_installs_torch_ray_and_nyxray_on_every_node():
    config = _launcher()
    script = "\n".join(config["setup_commands"])  # setup_commands run on all nodes
    assert "TORCH_SPEC" in script and '"$TORCH_SPEC"' in script
    assert "NYXRAY_SPEC" in script and '"$NYXRAY_SPEC"' in script
    assert "git+" in script, "the git alternative is documented next to the wheel default"
    _pinned_ray_version(config)
    # The default installs the wheel that file_mounts copies to the nodes.
    mounts = config["file_mounts"]
    (remote,) = [r for r in mounts if r.endswith("nyxray-dist")]
    assert remote.rstrip("/").split("/")[-1] in script
    # `ray` must come from the virtualenv the setup created.
    assert "nyxray-venv/bin" in script and ".bashrc" in script
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("ray start --address" in c for c in config["worker_start_ray_commands"])


def test_launcher_setup_script_is_valid_bash():
    for command in _launcher()["setup_commands"]:
        subprocess.run(["bash", "-n", "-c", command], check=True, timeout=10)


# --------------------------------------------------------------------------
# rayjob.yaml


def test_rayjob_runs_nyxray():
    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    spec = job["spec"]
    entrypoint = spec["entrypoint"].split()
    assert entrypoint[0] == "nyxray" and entrypoint[1] in ("merge", "sweep")
    assert entrypoint[3].startswith("s3://"), "output goes to object storage"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict)
    assert not any(SECRET_NAME.search(k) for k in runtime_env.get("env_vars", {})), "credentials belong in a Secret, not in the runtime env"
    assert spec["rayClusterSpec"]["rayVersion"] == _pinned_ray_version(_launcher())


def test_rayjob_entrypoint_parses_with_nyxray_cli():
    cli = pytest.importorskip("nyxray.cli")
    if not hasattr(cli, "build_parser"):
        pytest.skip("nyxray.cli has no build_parser()")
    argv = shlex.split(_rayjob()["spec"]["entrypoint"])
    args = cli.build_parser().parse_args(argv[1:])  # SystemExit on an unknown flag
    assert args.command in ("merge", "sweep")
    assert args.device == "cuda"


def test_rayjob_gpu_workers_and_actor_count():
    job = _rayjob()
    cluster = job["spec"]["rayClusterSpec"]
    head = _containers(cluster["headGroupSpec"]["template"])[0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})

    total_gpus = 0
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for container in _containers(group["template"]):
            gpus = int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
            total_gpus += gpus * group["replicas"]
    assert total_gpus > 0, "a worker group requests nvidia.com/gpu"

    args = job["spec"]["entrypoint"].split()
    assert args[args.index("--device") + 1] == "cuda"
    assert args[args.index("--actor-gpus") + 1] == "1"
    assert int(args[args.index("--actors") + 1]) == total_gpus, "one actor per GPU"

    images = {c["image"] for t in _all_pod_templates(job) for c in _containers(t)}
    assert len(images) == 1, "head and workers run the same image"


def test_rayjob_recipe_comes_from_configmap():
    docs = _rayjob_docs()
    job = _rayjob()
    (configmap,) = [d for d in docs if d.get("kind") == "ConfigMap"]
    assert configmap["apiVersion"] == "v1"
    head_template = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    volumes = {v["name"]: v for v in head_template["spec"]["volumes"] if "configMap" in v}
    (volume,) = [v for v in volumes.values() if v["configMap"]["name"] == configmap["metadata"]["name"]]
    mounts = [m for c in _containers(head_template) for m in c.get("volumeMounts", []) if m["name"] == volume["name"]]
    assert mounts, "the recipe ConfigMap is mounted in the head pod (where the driver runs)"
    recipe_path = job["spec"]["entrypoint"].split()[2]
    mount_path = mounts[0]["mountPath"].rstrip("/")
    assert recipe_path.startswith(mount_path + "/")
    key = recipe_path[len(mount_path) + 1 :]
    recipe = yaml.safe_load(configmap["data"][key])
    assert recipe["merge_method"]


def test_rayjob_secrets_are_referenced_not_inlined():
    job = _rayjob()
    seen_secret_refs = 0
    for template in _all_pod_templates(job):
        for container in _containers(template):
            names = set()
            for env in container.get("env", []):
                names.add(env["name"])
                if SECRET_NAME.search(env["name"]):
                    assert "value" not in env, f"{env['name']} must not be inlined"
                    assert "secretKeyRef" in env["valueFrom"], env["name"]
                    seen_secret_refs += 1
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= names, container["name"]
    assert seen_secret_refs
    for doc in _rayjob_docs():
        assert doc.get("kind") != "Secret", "no Secret objects with data in the repo"


def test_no_literal_credentials_in_cluster_dir():
    patterns = [
        re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
        re.compile(r"aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{40}", re.I),
        re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),  # Hugging Face tokens
        re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    ]
    files = [p for p in CLUSTER.rglob("*") if p.is_file()]
    assert files
    for path in files:
        text = path.read_text(errors="replace")
        for pattern in patterns:
            assert not pattern.search(text), f"{path.name}: looks like a credential ({pattern.pattern})"


# --------------------------------------------------------------------------
# submit.sh


def _bare_env(tmp_path: Path, **extra: str) -> dict:
    # Start from nothing, so the developer's own AWS_* variables do not leak in.
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "LC_ALL": "C",
        "PYTHON": sys.executable,
    }
    env.update(extra)
    return env


def _stub_ray(tmp_path: Path) -> Path:
    """A `ray` that records its argv and the runtime env file it was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "ray"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        'printf "%s\\0" "$@" > "$CAPTURE/argv"\n'
        'prev=""\n'
        'for a in "$@"; do\n'
        '  if [ "$prev" = "--runtime-env" ]; then cat "$a" > "$CAPTURE/runtime_env"; fi\n'
        "  prev=$a\n"
        "done\n"
        'exit "${STUB_RC:-0}"\n'
    )
    stub.chmod(0o755)
    return bin_dir


def _run_submit(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SUBMIT), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=30)


def test_submit_sh_syntax():
    subprocess.run(["bash", "-n", str(SUBMIT)], check=True, timeout=10)
    assert os.access(SUBMIT, os.X_OK), "submit.sh is executable"
    assert "set -euo pipefail" in SUBMIT.read_text()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_submit_sh_shellcheck():
    result = subprocess.run(["shellcheck", str(SUBMIT)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_submit_sh_help_needs_no_cluster_nor_ray(tmp_path):
    result = _run_submit(["--help"], _bare_env(tmp_path), tmp_path)  # no `ray` on PATH
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")
    assert "merge|sweep RECIPE OUT" in result.stdout
    assert "--address" in result.stdout


@pytest.mark.parametrize("args", [[], ["merge"], ["merge", "r.yaml"], ["plan", "r.yaml", "s3://b/o"], ["--bogus"]])
def test_submit_sh_usage_errors(tmp_path, args):
    result = _run_submit(args, _bare_env(tmp_path), tmp_path)
    assert result.returncode == 2
    assert "usage" in result.stderr.lower() or "--help" in result.stderr


def test_submit_sh_submits_nyxray_with_runtime_env(tmp_path):
    recipes = tmp_path / "work" / "recipes"
    recipes.mkdir(parents=True)
    (recipes / "slerp.yaml").write_text("merge_method: slerp\n")
    capture = tmp_path / "capture"
    capture.mkdir()
    secret = "wJalrXUtnFEMI-not-a-real-secret-value"
    env = _bare_env(
        tmp_path,
        PATH=f"{_stub_ray(tmp_path)}:/usr/bin:/bin",
        CAPTURE=str(capture),
        AWS_ACCESS_KEY_ID="test-access-key-id",
        AWS_SECRET_ACCESS_KEY=secret,
        AWS_DEFAULT_REGION="us-west-2",
        AWS_PROFILE="laptop-profile",
        AWS_CONFIG_FILE="/home/me/.aws/config",
        HF_TOKEN="test-hf-token",
        HF_HOME="/home/me/.cache/hf",
        UNRELATED="x",
    )
    result = _run_submit(
        [
            "--address",
            "http://head:8265",
            "merge",
            "work/recipes/slerp.yaml",
            "s3://b/out",
            "--device",
            "cuda",
            "--actors",
            "4",
            "--actor-gpus",
            "1",
            "--model",
            "a=s3://b/m a",
        ],
        env,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    argv = (capture / "argv").read_text().split("\0")[:-1]
    assert argv[:2] == ["job", "submit"]
    assert argv[argv.index("--address") + 1] == "http://head:8265"
    assert argv[argv.index("--submission-id") + 1].startswith("nyxray-merge-")
    entrypoint = argv[argv.index("--") + 1 :]
    assert entrypoint == [
        "nyxray",
        "merge",
        "slerp.yaml",
        "s3://b/out",
        "--device",
        "cuda",
        "--actors",
        "4",
        "--actor-gpus",
        "1",
        "--model",
        "a=s3://b/m a",
    ]

    runtime_env = json.loads((capture / "runtime_env").read_text())
    assert runtime_env["working_dir"] == str(recipes.resolve())
    assert "*.safetensors" in runtime_env["excludes"]
    assert runtime_env["env_vars"] == {
        "AWS_ACCESS_KEY_ID": "test-access-key-id",
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-west-2",
        "HF_TOKEN": "test-hf-token",
    }
    assert "pip" not in runtime_env

    # Values are neither printed nor put on ray's command line.
    for value in (secret, "test-hf-token", "test-access-key-id"):
        assert value not in result.stdout + result.stderr
        assert value not in "\0".join(argv)
    assert "AWS_SECRET_ACCESS_KEY" in result.stderr  # names are reported


def test_submit_sh_options_and_exit_status(tmp_path):
    (tmp_path / "sweep.yaml").write_text("models: []\n")
    capture = tmp_path / "capture"
    capture.mkdir()
    env = _bare_env(
        tmp_path,
        PATH=f"{_stub_ray(tmp_path)}:/usr/bin:/bin",
        CAPTURE=str(capture),
        AWS_SECRET_ACCESS_KEY="not-passed",
        MY_ENDPOINT="http://minio:9000",
        RAY_ADDRESS="http://from-env:8265",
        STUB_RC="1",  # the job failed
    )
    result = _run_submit(
        [
            "--no-env",
            "--env",
            "MY_ENDPOINT",
            "--pip",
            "nyxray @ git+https://example.invalid/nyxray.git",
            "--submission-id",
            "sweep-1",
            "--no-wait",
            "sweep",
            "sweep.yaml",
            "s3://b/sweeps",
            "--fail-fast",
        ],
        env,
        tmp_path,
    )
    assert result.returncode == 1, "the job's failure is the script's exit status"
    argv = (capture / "argv").read_text().split("\0")[:-1]
    assert "--address" not in argv, "RAY_ADDRESS is left to ray"
    assert "--no-wait" in argv
    assert argv[argv.index("--submission-id") + 1] == "sweep-1"
    assert argv[argv.index("--") + 1 :] == ["nyxray", "sweep", "sweep.yaml", "s3://b/sweeps", "--fail-fast"]
    runtime_env = json.loads((capture / "runtime_env").read_text())
    assert runtime_env["env_vars"] == {"MY_ENDPOINT": "http://minio:9000"}
    assert runtime_env["pip"] == ["nyxray @ git+https://example.invalid/nyxray.git"]


def test_submit_sh_defaults_and_missing_recipe(tmp_path):
    (tmp_path / "r.yaml").write_text("merge_method: linear\n")
    capture = tmp_path / "capture"
    capture.mkdir()
    env = _bare_env(tmp_path, PATH=f"{_stub_ray(tmp_path)}:/usr/bin:/bin", CAPTURE=str(capture))
    result = _run_submit(["merge", "r.yaml", "s3://b/out"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    argv = (capture / "argv").read_text().split("\0")[:-1]
    assert argv[argv.index("--") + 1 :] == ["nyxray", "merge", "r.yaml", "s3://b/out"]
    assert argv[argv.index("--address") + 1] == "http://127.0.0.1:8265"
    runtime_env = json.loads((capture / "runtime_env").read_text())
    assert runtime_env["env_vars"] == {}
    assert runtime_env["working_dir"] == str(tmp_path.resolve())

    (capture / "argv").unlink()
    result = _run_submit(["merge", "s3://b/recipes/r.yaml", "s3://b/out"], env, tmp_path)
    assert result.returncode == 2 and "recipe not found" in result.stderr
    assert not (capture / "argv").exists(), "nothing was submitted"
