"""cluster/: the launcher YAML passes Ray's own validation; KubeRay manifests have what they need;
every recipe requires Ray's token auth and no MLflow server listens on the network without auth."""

import copy
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
WORKING_DIR_LIMIT = 100 * 1024 * 1024


def load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def test_launcher_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load("cluster.yaml")
    validate_config(cfg)
    validate_config(prepare_config(copy.deepcopy(cfg)))
    types = cfg["available_node_types"]
    assert "GPU" not in types[cfg["head_node_type"]]["resources"]
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())


def test_ray_validation_rejects_a_broken_launcher_yaml():
    from ray.autoscaler._private.util import validate_config

    cfg = load("cluster.yaml")
    cfg["available_node_types"]["worker-gpu"]["min_wokers"] = 1  # typo -> schema error
    with pytest.raises(jsonschema.ValidationError):
        validate_config(cfg)


def _containers(template):
    return template["spec"]["containers"]


@pytest.mark.parametrize("name", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_kuberay_manifests_have_required_fields(name):
    doc = load(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == "2.60.0"
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head and _containers(head["template"])[0]["image"]
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c["resources"]["limits"]
                         for c in _containers(g["template"]))]
    assert gpu_groups and all(g["groupName"] and g["maxReplicas"] >= g["minReplicas"]
                              for g in gpu_groups)
    for group in [head, *spec["workerGroupSpecs"]]:
        env = {e["name"]: e.get("value", "") for c in _containers(group["template"])
               for e in c.get("env", [])}
        assert env.get("MLFLOW_TRACKING_URI", "").startswith("http")


def test_rayjob_entrypoint_and_runtime_env():
    doc = load("kuberay/rayjob.yaml")
    assert doc["kind"] == "RayJob"
    script = doc["spec"]["entrypoint"].split()[1]
    assert (ROOT / script).is_file()
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    assert {".git", ".venv", "outputs", "data"} <= set(env["excludes"])


def test_runtime_env_keeps_working_dir_small():
    env = load("runtime_env.yaml")
    assert {".git", ".venv", "outputs", "data"} <= set(env["excludes"])
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    size = sum((ROOT / f).stat().st_size for f in files if (ROOT / f).is_file())
    assert size < WORKING_DIR_LIMIT


# ------------------------------------------------------------------------------------ security

RECIPES = ["cluster.yaml", "runtime_env.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml"]
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def _walk(node, path=()):
    """(path, dict) for every mapping in a parsed YAML document, recursively."""
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, (*path, i))


def _documents(name):
    """A recipe and the YAML documents embedded in it (RayJob's runtimeEnvYAML)."""
    doc = load(name)
    docs = [doc]
    for _, mapping in _walk(doc):
        if isinstance(mapping.get("runtimeEnvYAML"), str):
            docs.append(yaml.safe_load(mapping["runtimeEnvYAML"]))
    return docs


def auth_mode_settings(name):
    """Every RAY_AUTH_MODE value a recipe sets: env lists, env_vars maps, shell commands."""
    found = []
    for doc in _documents(name):
        for _, mapping in _walk(doc):
            if mapping.get("name") == "RAY_AUTH_MODE":
                found.append(str(mapping.get("value", "")))
            if "RAY_AUTH_MODE" in mapping:
                found.append(str(mapping["RAY_AUTH_MODE"]))
    text = (CLUSTER / name).read_text()
    found += re.findall(r"RAY_AUTH_MODE\s*=\s*[\"']?(\w+)", text)
    return found


@pytest.mark.parametrize("name", RECIPES)
def test_no_recipe_disables_ray_auth(name):
    assert all(mode == "token" for mode in auth_mode_settings(name)), auth_mode_settings(name)
    text = (CLUSTER / name).read_text()
    assert not re.search(r"RAY_AUTH_MODE\W+disabled", text)
    # a token is never written into a recipe: only Secret references or token files
    for doc in _documents(name):
        for _, mapping in _walk(doc):
            if mapping.get("name") in ("RAY_AUTH_TOKEN", "MLFLOW_TRACKING_PASSWORD"):
                assert "value" not in mapping and mapping["valueFrom"]["secretKeyRef"]
            assert "RAY_AUTH_TOKEN" not in mapping and "MLFLOW_TRACKING_PASSWORD" not in mapping


def test_auth_mode_scan_sees_a_disabled_setting(tmp_path, monkeypatch):
    """The scan above can fail: a recipe that disables auth is reported."""
    (tmp_path / "bad.yaml").write_text(
        "env_vars: {RAY_AUTH_MODE: disabled}\n"
        "env: [{name: RAY_AUTH_MODE, value: disabled}]\n"
        "cmd: RAY_AUTH_MODE=disabled ray start --head\n")
    monkeypatch.setattr(sys.modules[__name__], "CLUSTER", tmp_path)
    assert auth_mode_settings("bad.yaml") == ["disabled", "disabled", "disabled"]


def test_launcher_starts_every_node_with_token_auth():
    cfg = load("cluster.yaml")
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
              if "ray start" in c]
    assert len(starts) == 2
    for command in starts:
        assert "RAY_AUTH_MODE=token" in command.split(), command
        assert "RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token" in command.split(), command
    head = next(c for c in starts if "--head" in c)
    host = re.search(r"--dashboard-host[= ](\S+)", head).group(1)
    assert host in LOOPBACK_HOSTS  # the dashboard / Jobs API only through the SSH tunnel
    assert "~/.ray/auth_token" in cfg["file_mounts"]


def _ray_containers(spec):
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        yield from _containers(group["template"])


@pytest.mark.parametrize("name", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_kuberay_clusters_require_a_token(name):
    doc = load(name)
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    if spec.get("authOptions", {}).get("mode") == "token":
        return  # the operator creates the Secret and sets the variables on every container
    envs = [c.get("env", []) for c in _ray_containers(spec)]
    if spec.get("enableInTreeAutoscaling"):
        envs.append(spec.get("autoscalerOptions", {}).get("env", []))
    for env in envs:
        by_name = {e["name"]: e for e in env}
        assert by_name.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{name}: {env}"
        assert by_name.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef"), env


# MLflow servers: in the docs and recipes, never on a non-loopback host without auth

def mlflow_server_commands(text):
    """Each `mlflow server ...` shell command in a text (continuation lines joined)."""
    text = re.sub(r"\\\s*\n\s*", " ", text)
    return [" ".join(m.group(0).split()) for m in re.finditer(r"mlflow server\b[^\n`]*", text)]


def exposed_without_auth(command):
    """True if this `mlflow server` command listens beyond loopback without an auth app."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        words = command.split()
    host, app = "127.0.0.1", ""  # MLflow's default host
    for i, word in enumerate(words):
        if word in ("--host", "-h") and i + 1 < len(words):
            host = words[i + 1]
        elif word.startswith("--host="):
            host = word.split("=", 1)[1]
        elif word == "--app-name" and i + 1 < len(words):
            app = words[i + 1]
        elif word.startswith("--app-name="):
            app = word.split("=", 1)[1]
    return host not in LOOPBACK_HOSTS and app != "basic-auth"


def _doc_files():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    paths = {ROOT / f for f in files}
    paths |= set(CLUSTER.rglob("*"))  # new, not yet committed recipes too
    return sorted(p for p in paths if p.is_file() and (
        p.suffix in (".md", ".yaml", ".yml", ".sh", ".txt", ".ini", ".toml", ".cfg")
        or p.name in ("Makefile", "Dockerfile")))


def test_mlflow_servers_never_listen_on_the_network_without_auth():
    commands = {}
    for path in _doc_files():
        for command in mlflow_server_commands(path.read_text(errors="replace")):
            commands.setdefault(str(path.relative_to(ROOT)), []).append(command)
    assert commands.get("cluster/MLFLOW.md"), "the cluster MLflow recipe is missing"
    bad = {f: [c for c in cs if exposed_without_auth(c)] for f, cs in commands.items()}
    assert not any(bad.values()), bad
    assert "--app-name basic-auth" in (CLUSTER / "MLFLOW.md").read_text()


def test_mlflow_command_check_catches_an_open_server():
    open_server = mlflow_server_commands("mlflow server --host 0.0.0.0 \\\n  --port 5000")
    assert open_server == ["mlflow server --host 0.0.0.0 --port 5000"]
    assert exposed_without_auth(open_server[0])
    assert exposed_without_auth("mlflow server --host=10.0.0.5")
    assert not exposed_without_auth("mlflow server --port 5000")
    assert not exposed_without_auth("mlflow server --host 127.0.0.1")
    assert not exposed_without_auth("mlflow server --app-name basic-auth --host 0.0.0.0")
