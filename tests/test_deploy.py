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
