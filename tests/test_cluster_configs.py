"""cluster/: the launcher YAML passes Ray's own validation; KubeRay manifests have what they need."""

import copy
import subprocess
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
        env = {e["name"]: e["value"] for c in _containers(group["template"])
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
