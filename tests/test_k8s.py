"""KubeRay manifests: valid against the CRD schemas, serveConfigV2 a valid Serve config in sync
with the local one, and only the serving ports exposed."""
import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CRDS = ROOT.parent / "shared" / "kuberay-crds"
K8S = ROOT / "k8s"


def crd_schema(kind: str) -> dict:
    path = CRDS / f"ray.io_{kind.lower()}s.yaml"
    if not path.exists():
        pytest.skip(f"KubeRay CRDs not found at {CRDS}")
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


def apply_json_patch(doc: dict, ops: list[dict]) -> dict:
    """The JSON 6902 subset our overlays use: add, replace, remove."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key = (len(node) if last == "-" else int(last)) if isinstance(node, list) else last
        if op["op"] == "add" and isinstance(node, list):
            node.insert(key, op["value"])
        elif op["op"] == "remove":
            del node[key]
        elif op["op"] == "replace":
            assert key in node or isinstance(node, list), f"replace of missing {op['path']}"
            node[key] = op["value"]
        else:
            node[key] = op["value"]
    return doc


def render(overlay: str | None) -> list[dict]:
    base = K8S / "base"
    docs = [d for f in yaml.safe_load((base / "kustomization.yaml").read_text())["resources"]
            for d in yaml.safe_load_all((base / f).read_text())]
    if overlay:
        kust = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
        for patch in kust["patches"]:
            ops = yaml.safe_load((K8S / "overlays" / overlay / patch["path"]).read_text())
            docs = [apply_json_patch(d, ops) if d["kind"] == patch["target"]["kind"] else d for d in docs]
    return docs


def rayservice(docs):
    return next(d for d in docs if d["kind"] == "RayService")


@pytest.mark.parametrize("overlay", [None, "cpu", "gcs-ft", "tiers"])
def test_manifests_validate_against_kuberay_crds(overlay):
    for doc in render(overlay):
        if doc["apiVersion"].startswith("ray.io/"):
            jsonschema.validate(doc, crd_schema(doc["kind"]))


@pytest.mark.parametrize("overlay", [None, "cpu", "gcs-ft", "tiers"])
def test_serve_config_is_a_valid_serve_config_that_builds(overlay, monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    from deployments.config import app_config

    monkeypatch.chdir(ROOT)
    conf = yaml.safe_load(rayservice(render(overlay))["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(conf)
    app_config(conf["applications"][0]["args"])  # the application's own schema accepts it


def test_serve_config_matches_the_local_one():
    """Same application as deployments/serve_local.yaml; only the cluster settings differ."""
    for overlay in (None, "cpu"):
        local = yaml.safe_load((ROOT / "deployments" / "serve_local.yaml").read_text())
        remote = yaml.safe_load(rayservice(render(overlay))["spec"]["serveConfigV2"])
        cluster_only = ("num_cpus", "num_gpus", "label_selector", "max", "device")
        for conf in (local, remote):
            conf["http_options"].pop("host")
            conf["grpc_options"].pop("enable_reflection", None)  # off on a cluster (docs/security.md)
            args = conf["applications"][0]["args"]
            args.pop("data_plane_host")
            for group in ("worker", "routers"):
                args[group] = {k: v for k, v in args[group].items() if k not in cluster_only}
        assert remote == local


def test_only_serving_ports_are_exposed():
    for overlay in (None, "cpu", "gcs-ft", "tiers"):
        docs = render(overlay)
        service = rayservice(docs)["spec"]["serveService"]
        assert sorted(p["port"] for p in service["spec"]["ports"]) == [8000, 9000]
        assert service["spec"]["type"] == "ClusterIP"
        assert not [d for d in docs if d["kind"] == "Service"]  # no other Service of ours
        head = rayservice(docs)["spec"]["rayClusterConfig"]["headGroupSpec"]
        assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"


def test_router_and_expert_groups_scale_independently_and_cpu_overlay():
    base = rayservice(render(None))["spec"]
    groups = {g["groupName"]: g for g in base["rayClusterConfig"]["workerGroupSpecs"]}
    assert set(groups) == {"routers-gpu", "experts-gpu"}
    args = yaml.safe_load(base["serveConfigV2"])["applications"][0]["args"]
    for name, role, section in (("routers-gpu", "routers", args["routers"]), ("experts-gpu", "experts",
                                                                             args["worker"])):
        group = groups[name]
        assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert group["rayStartParams"]["labels"] == f"moe-cluster/role={role}"
        assert section["label_selector"] == {"moe-cluster/role": role} and section["num_gpus"] == 1
        assert group["minReplicas"] < group["maxReplicas"]  # each group scales on its own
    assert args["routers"]["max"] > args["routers"]["min"] and args["routers"]["device"] == "cuda"
    cpu = rayservice(render("cpu"))["spec"]
    assert "nvidia.com/gpu" not in str(cpu["rayClusterConfig"])
    assert yaml.safe_load(cpu["serveConfigV2"])["applications"][0]["args"]["worker"]["num_gpus"] == 0


def test_schema_check_catches_a_broken_manifest():
    doc = rayservice(render(None))
    doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, crd_schema("RayService"))


def test_tiers_overlay_has_a_gpu_group_and_a_cpu_group_that_scale_independently():
    spec = rayservice(render("tiers"))["spec"]
    groups = {g["groupName"]: g for g in spec["rayClusterConfig"]["workerGroupSpecs"]}
    assert set(groups) == {"routers-gpu", "experts-fast-gpu", "experts-host-cpu"}
    tiers = {t["name"]: t for t in yaml.safe_load(spec["serveConfigV2"])["applications"][0]["args"]["tiers"]}
    for name, tier in (("experts-fast-gpu", tiers["fast"]), ("experts-host-cpu", tiers["host"])):
        group = groups[name]
        assert group["rayStartParams"]["labels"] == "moe-cluster/role={}".format(
            tier["label_selector"]["moe-cluster/role"])
        assert group["minReplicas"] < group["maxReplicas"]
    limits = {n: groups[n]["template"]["spec"]["containers"][0]["resources"]["limits"] for n in groups}
    assert limits["experts-fast-gpu"]["nvidia.com/gpu"] == "1" and tiers["fast"]["device"] == "cuda"
    assert "nvidia.com/gpu" not in limits["experts-host-cpu"] and tiers["host"]["device"] == "cpu"
