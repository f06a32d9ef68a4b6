"""deploy/: the Kubernetes manifests validate against the Kubernetes API schemas (strict: no unknown fields),
the kustomization lists every manifest, probes and grace periods fit the drain, and the README's deploy steps
name what is there."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33.0"


def _documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


@pytest.mark.parametrize("name, doc", _documents(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_each_manifest_validates_against_the_kubernetes_schema(name, doc):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_kustomization_lists_every_manifest_and_nothing_else():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def _flag(args: list[str], name: str) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith(f"--{name}="))


def test_probes_and_grace_periods_fit_the_drain():
    deployments = [doc for _, doc in _documents() if doc["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {
        "longserve-controller",
        "longserve-worker",
        "longserve-api",
    }
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["livenessProbe"]["httpGet"]["path"] == "/live"
        assert container["readinessProbe"]["httpGet"]["path"] == "/health"
        if any(a.startswith("--shutdown-timeout=") for a in container["args"]):
            # Kubernetes kills the pod at the grace period: the drain must end first.
            assert (
                pod["terminationGracePeriodSeconds"] > float(_flag(container["args"], "shutdown-timeout")) + 5
            )
    api = next(d for d in deployments if d["metadata"]["name"] == "longserve-api")
    annotations = api["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    budgets = {doc["metadata"]["name"] for _, doc in _documents() if doc["kind"] == "PodDisruptionBudget"}
    assert budgets == {"longserve-worker", "longserve-api"}


def test_the_container_args_are_flags_longserve_accepts():
    from longserve.cli import build_parser

    parser = build_parser()
    for _, doc in _documents():
        if doc["kind"] == "Deployment":
            args = [
                a.replace("$(POD_IP)", "10.0.0.1")
                for a in doc["spec"]["template"]["spec"]["containers"][0]["args"]
            ]
            parser.parse_args(args)  # an unknown flag exits (SystemExit) and fails the test


def test_the_readme_deploy_steps_match_the_files():
    readme = (ROOT / "README.md").read_text()
    assert "kubectl apply -k deploy/k8s" in readme
    assert "docker build -f deploy/Dockerfile" in readme
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    torch_line = dockerfile.index("torch==")
    assert torch_line < dockerfile.index("pip install --no-cache-dir . ")  # the CPU torch before the package


def _merge(base, patch):
    """A strategic merge as kubectl does it for these files: maps merge, containers merge by name, other
    lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: _merge(base[k], v) if k in base else v for k, v in patch.items()}}
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(x, dict) and "name" in x for x in base + patch)
    ):
        merged = {x["name"]: x for x in base}
        for x in patch:
            merged[x["name"]] = _merge(merged[x["name"]], x) if x["name"] in merged else x
        return list(merged.values())
    return patch


def test_the_gpu_overlay_gives_workers_a_gpu_and_stays_valid():
    overlay = K8S / "overlays" / "gpu"
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../.."] and kustomization["images"][0]["newTag"] == "cuda"
    (patch_file,) = [p["path"] for p in kustomization["patches"]]
    patch = yaml.safe_load((overlay / patch_file).read_text())
    base = next(
        doc
        for _, doc in _documents()
        if doc["metadata"]["name"] == "longserve-worker" and doc["kind"] == "Deployment"
    )
    worker = _merge(base, patch)
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(worker, KUBERNETES_VERSION, strict=True)
    container = worker["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 and "--device=cuda" in container["args"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/live"  # kept from the base
    from longserve.cli import build_parser

    build_parser().parse_args([a.replace("$(POD_IP)", "10.0.0.1") for a in container["args"]])
