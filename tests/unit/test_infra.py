"""infra/: every deployment file is checked against the schema its consumer enforces, and against the
resources, names and versions the pipeline actually uses, so that a wrong edit fails here, not on a cluster."""
from __future__ import annotations

import copy
import functools
import json
import math
import re
import shlex
from pathlib import Path

import pytest
import yaml

from tests.cluster_requests import cloud_demands, fits

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
CRDS = ROOT.parent / "shared" / "schemas" / "kuberay"
LAUNCHER_FILES = sorted((INFRA / "ray").glob("cluster-*.yaml"))
# Launcher node type -> KubeRay worker group (Kubernetes names cannot hold underscores).
GROUP_OF = {"cpu_ingest": "cpu-ingest", "gpu_train": "gpu-train"}


def _yaml(path: Path):
    return yaml.safe_load(path.read_text())


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def launcher_node_types(path: Path) -> dict[str, dict]:
    return _yaml(path)["available_node_types"]


def kuberay_group_resources(group: dict) -> dict[str, float]:
    """The Ray resources a KubeRay pod advertises: CPU/GPU from the container limits, custom ones from
    rayStartParams.resources (a JSON object inside a quoted string, as KubeRay passes it to `ray start`)."""
    params = group.get("rayStartParams", {})
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    res = {"CPU": float(params.get("num-cpus", limits.get("cpu", 0))), "GPU": float(limits.get("nvidia.com/gpu", 0))}
    if "resources" in params:
        res.update(json.loads(params["resources"].strip().strip('"').replace('\\"', '"')))
    return res


# ------------------------------------------------------------------ Ray cluster launcher

@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_config_matches_rays_own_schema(path):
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(_yaml(path), schema)


def test_launcher_schema_check_catches_a_wrong_edit():
    """The validation above has teeth: the mistakes an edit makes are refused."""
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    good = _yaml(LAUNCHER_FILES[0])
    for edit in (lambda c: c["available_node_types"]["gpu_train"]["resources"].update(GPU=0.5),
                 lambda c: c["available_node_types"]["gpu_train"].update(max_worker=4),
                 lambda c: c.pop("provider")):
        bad = copy.deepcopy(good)
        edit(bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_launcher_node_types_are_what_the_runbook_says():
    cfg = _yaml(INFRA / "ray" / "cluster-aws.yaml")
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and types[cfg["head_node_type"]]["resources"].get("CPU") == 0
    assert set(types) - {cfg["head_node_type"]} == set(GROUP_OF)
    assert types["cpu_ingest"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert types["gpu_train"]["resources"]["GPU"] == 8 and types["gpu_train"]["min_workers"] == 0
    assert 0 < types["gpu_train"]["max_workers"] <= cfg["max_workers"]
    assert cfg["idle_timeout_minutes"] > 0
    assert not cfg["setup_commands"] and not cfg["worker_setup_commands"], "nothing is installed at node start"


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_node_types_serve_every_request_of_the_pipeline(path):
    d = cloud_demands()
    types = {k: v["resources"] for k, v in launcher_node_types(path).items()}
    _assert_placement(d, types["cpu_ingest"], types["gpu_train"], launcher_node_types(path)["gpu_train"]["max_workers"])


def _assert_placement(d, cpu_node, gpu_node, gpu_max_nodes):
    # Decoding lands on the CPU type only (a GPU node is never started for it).
    assert fits(d["decode"], cpu_node) and not fits(d["decode"], gpu_node), (d["decode"], cpu_node, gpu_node)
    # Training workers and render actors land on the GPU type only.
    assert fits(d["train_worker"], gpu_node) and not fits(d["train_worker"], cpu_node)
    assert fits(d["render_actor"], gpu_node) and not fits(d["render_actor"], cpu_node)
    # Every training worker of a stage gets a slot within the GPU type's max node count.
    per_node = min(math.floor(gpu_node[k] / v) for k, v in d["train_worker"].items() if v > 0)
    assert per_node >= 1 and math.ceil(d["_num_train_workers"]["n"] / per_node) <= gpu_max_nodes


# ------------------------------------------------------------------ KubeRay

def _openapi_to_jsonschema(node):
    """KubeRay's openAPIV3Schema as a strict JSON Schema: unknown fields are refused (kubectl's default
    strict field validation), int-or-string is either, the x-kubernetes-* annotations are dropped."""
    if isinstance(node, list):
        return [_openapi_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _openapi_to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def _crd_schema_cached(kind: str) -> str:
    path = CRDS / f"ray.io_{kind.lower()}s.yaml"
    crd = _yaml(path)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return json.dumps(_openapi_to_jsonschema(version["schema"]["openAPIV3Schema"]))


def _crd_schema(kind: str) -> dict:
    path = CRDS / f"ray.io_{kind.lower()}s.yaml"
    if not path.exists():
        pytest.skip(f"KubeRay CRDs not present ({path})")
    return json.loads(_crd_schema_cached(kind))


@pytest.mark.parametrize("name,kind", [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")])
def test_kuberay_manifests_match_the_crd_schema(name, kind):
    import jsonschema

    doc = _yaml(INFRA / "k8s" / name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    jsonschema.validate(doc, _crd_schema(kind))


def test_kuberay_schema_check_catches_a_wrong_edit():
    import jsonschema

    schema = _crd_schema("RayCluster")
    good = _yaml(INFRA / "k8s" / "raycluster.yaml")
    for edit in (lambda d: d["spec"]["workerGroupSpecs"][0].pop("groupName"),
                 lambda d: d["spec"]["workerGroupSpecs"][1].update(maxReplica=3),  # typo of maxReplicas
                 lambda d: d["spec"]["autoscalerOptions"].update(upscalingMode="Fast")):
        bad = copy.deepcopy(good)
        edit(bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_kuberay_groups_mirror_the_launcher_and_serve_the_pipeline():
    cluster = _yaml(INFRA / "k8s" / "raycluster.yaml")["spec"]
    launcher = launcher_node_types(INFRA / "ray" / "cluster-aws.yaml")
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == set(GROUP_OF.values())
    res = {}
    for node_type, group_name in GROUP_OF.items():
        g = groups[group_name]
        assert g["minReplicas"] == launcher[node_type]["min_workers"] == 0
        assert g["maxReplicas"] == launcher[node_type]["max_workers"]
        res[node_type] = kuberay_group_resources(g)
        # Same custom resources and GPU count as the launcher's node type.
        custom = {k: v for k, v in launcher[node_type]["resources"].items() if k not in ("CPU", "GPU")}
        assert {k: res[node_type][k] for k in custom} == custom
        assert res[node_type]["GPU"] == launcher[node_type]["resources"].get("GPU", 0)
    _assert_placement(cloud_demands(), res["cpu_ingest"], res["gpu_train"], groups["gpu-train"]["maxReplicas"])


def test_rayjob_runs_the_workflow_on_the_same_cluster_and_cleans_up():
    from orchestration.hydra_config import load

    job = _yaml(INFRA / "k8s" / "rayjob.yaml")["spec"]
    cluster = _yaml(INFRA / "k8s" / "raycluster.yaml")["spec"]
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    assert job["rayClusterSpec"] == {k: v for k, v in cluster.items() if k != "gcsFaultToleranceOptions"}
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["atoken", "run"]
    cfg = load("run", argv[2:]).validate()  # every override in the entrypoint is a valid, typed key
    assert cfg.train.scaling.use_gpu and cfg.cluster.storage.startswith("s3://")
    env = yaml.safe_load(job["runtimeEnvYAML"])
    assert env["env_vars"] == _yaml(INFRA / "ray" / "runtime_env.yaml")["env_vars"]
    assert cfg.tracking_uri == _mlflow_cluster_uri()


def test_gcs_fault_tolerance_points_at_the_redis_service():
    ft = _yaml(INFRA / "k8s" / "raycluster.yaml")["spec"]["gcsFaultToleranceOptions"]
    dep, svc = _docs(INFRA / "k8s" / "redis.yaml")
    host, port = ft["redisAddress"].rsplit(":", 1)
    assert host == f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local"
    assert int(port) == svc["spec"]["ports"][0]["port"]
    secret = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    env = dep["spec"]["template"]["spec"]["containers"][0]["env"]
    assert any(e.get("valueFrom", {}).get("secretKeyRef") == secret for e in env)


# ------------------------------------------------------------------ runtime env, image, MLflow

def test_runtime_env_is_accepted_by_ray_and_keeps_local_state_out():
    from ray.runtime_env import RuntimeEnv

    env = _yaml(INFRA / "ray" / "runtime_env.yaml")
    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert "pip" not in env and "conda" not in env, "the image has every package; clusters may be air-gapped"
    assert {".venv", ".git", "atoken-work"} <= set(env["excludes"])


def test_every_file_names_the_same_image():
    images = {_yaml(INFRA / "ray" / "cluster-aws.yaml")["docker"]["image"]}
    for name in ("raycluster.yaml", "rayjob.yaml"):
        images |= set(re.findall(r"image: (\S+)", (INFRA / "k8s" / name).read_text()))
    images |= {c["image"] for d in _docs(INFRA / "mlflow" / "mlflow.yaml") if d["kind"] == "Deployment"
               for c in d["spec"]["template"]["spec"]["containers"]}
    images.add(_yaml(INFRA / "mlflow" / "docker-compose.yml")["services"]["mlflow"]["image"])
    assert len(images) == 1, images
    tag = images.pop().rsplit(":", 1)[1]
    assert tag.startswith(_pyproject()["project"]["version"])
    assert f"-t {_yaml(INFRA / 'ray' / 'cluster-aws.yaml')['docker']['image']}" in (INFRA / "docker" / "Dockerfile").read_text()


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_dockerfile_pins_what_the_project_pins_and_ships_every_package():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    pins = dict(re.match(r"([A-Za-z0-9_.\-\[\],]+?)==(\S+)", d).groups() for d in _pyproject()["project"]["dependencies"] if "==" in d)
    assert "scripts/install.sh" in text  # torch pin, install order and pip check come from the one installer
    assert f'"gsplat=={pins["gsplat"]}"' in text
    assert "import gsplat.csrc" in text and "installed_ops" in text  # the build fails instead of a JIT later
    copied = set(re.findall(r"^COPY (\S+)/ ", text, re.M))
    packages = set(_pyproject()["tool"]["setuptools"]["packages"]["find"]["include"])
    assert {p.rstrip("*") for p in packages} <= copied and "infra" in copied


def _mlflow_cluster_uri() -> str:
    svc = next(d for d in _docs(INFRA / "mlflow" / "mlflow.yaml") if d["kind"] == "Service")
    return f"http://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local:{svc['spec']['ports'][0]['port']}"


def test_mlflow_deployment_runs_the_shared_server_script_on_postgres_and_s3():
    dep, svc = _docs(INFRA / "mlflow" / "mlflow.yaml")
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    c = pod["spec"]["containers"][0]
    assert c["command"] == ["bash", "/opt/atoken/infra/mlflow/serve.sh"]
    env = {e["name"]: e.get("value") or e["valueFrom"] for e in c["env"]}
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert int(env["MLFLOW_PORT"]) == svc["spec"]["ports"][0]["targetPort"] == c["ports"][0]["containerPort"]
    compose = _yaml(INFRA / "mlflow" / "docker-compose.yml")["services"]["mlflow"]
    assert compose["command"] == c["command"]
    assert compose["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert compose["environment"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    head_env = _yaml(INFRA / "k8s" / "raycluster.yaml")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert {e["name"]: e["value"] for e in head_env}["MLFLOW_TRACKING_URI"] == _mlflow_cluster_uri()
    script = (INFRA / "mlflow" / "serve.sh").read_text()
    assert "--serve-artifacts" in script and "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in script


@pytest.mark.parametrize("path", sorted((INFRA / "k8s").glob("*.yaml")) + sorted((INFRA / "mlflow").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_service_selects_a_workload_of_its_file(path):
    docs = _docs(path)
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    for svc in (d for d in docs if d["kind"] == "Service"):
        assert any(svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
                   and svc["metadata"]["namespace"] == w["metadata"]["namespace"] for w in workloads), svc["metadata"]
