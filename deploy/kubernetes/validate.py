"""Offline check of the Kubernetes manifests: renders each overlay as kustomize would for the
features used here (resources, namespace, labels, strategic-merge patches of named list items)
and validates every object against the Kubernetes schemas bundled in kubernetes-validate. Also
checks that the Prometheus scrape example (base/prometheus-scrape.yml) finds and labels the pods
the overlays render, and what keeps the pods shut: no secret in the manifests, no service
account token, the internal port off the Service and open to Prometheus only, a NetworkPolicy
that selects the pods and limits their egress.

    pip install kubernetes-validate pyyaml && python3 deploy/kubernetes/validate.py
"""

import copy
import ipaddress
import pathlib
import re
import sys
import tomllib

import kubernetes_validate
import yaml

KUBERNETES_VERSION = "1.33.0"
ROOT = pathlib.Path(__file__).parent
SCRAPE = ROOT / "base" / "prometheus-scrape.yml"
# The pod label that names the region; the scrape job copies it into `region`.
REGION_LABEL = "broker.example.net/region"
# The container port that serves /metrics, /healthz and /readyz (the broker's internal_listen).
METRICS_PORT_NAME = "internal"
# Environment variables whose names say they hold a secret: from a Secret, never inline.
SECRET_ENV = re.compile(r"KEYS__|PASSWORD|SECRET|TOKEN")


def merge(base, patch):
    """Strategic merge as used here: maps merge by key, lists of named maps merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = merge(base[key], value) if key in base else value
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(
        isinstance(x, dict) and "name" in x for x in base + patch
    ):
        out = [dict(x) for x in base]
        for item in patch:
            match = next((i for i, x in enumerate(out) if x["name"] == item["name"]), None)
            if match is None:
                out.append(item)
            else:
                out[match] = merge(out[match], item)
        return out
    return patch


def render(directory):
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objects = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        if path.is_dir():
            objects += render(path)
        else:
            objects += [o for o in yaml.safe_load_all(path.read_text()) if o]
    for entry in kustomization.get("labels", []):
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(entry["pairs"])
            if entry.get("includeSelectors"):
                spec = obj.get("spec", {})
                for selector in (spec.get("selector", {}),):
                    if obj["kind"] == "Service":
                        spec.setdefault("selector", {}).update(entry["pairs"])
                    elif "matchLabels" in selector:
                        selector["matchLabels"].update(entry["pairs"])
                if obj["kind"] == "NetworkPolicy":
                    # kustomize adds them to the peers' pod selectors too, not only the policy's.
                    for selector in network_policy_pod_selectors(obj):
                        if "matchLabels" in selector:
                            selector["matchLabels"].update(entry["pairs"])
            if entry.get("includeSelectors") or entry.get("includeTemplates"):
                template = obj.get("spec", {}).get("template", {}).get("metadata")
                if template is not None:
                    template.setdefault("labels", {}).update(entry["pairs"])
    for patch in kustomization.get("patches", []):
        change = yaml.safe_load((directory / patch["path"]).read_text())
        targets = [
            i for i, o in enumerate(objects)
            if o["kind"] == change["kind"] and o["metadata"]["name"] == change["metadata"]["name"]
        ]
        assert targets, f"{directory}: patch {patch['path']} matches no resource"
        for i in targets:
            objects[i] = merge(objects[i], change)
    if "namespace" in kustomization:
        for obj in objects:
            obj["metadata"]["namespace"] = kustomization["namespace"]
    return copy.deepcopy(objects)


def network_policy_pod_selectors(policy):
    """The policy's own pod selector, then its peers'."""
    spec = policy["spec"]
    yield spec["podSelector"]
    for rule in spec.get("ingress", []):
        yield from (peer["podSelector"] for peer in rule.get("from", []) if "podSelector" in peer)
    for rule in spec.get("egress", []):
        yield from (peer["podSelector"] for peer in rule.get("to", []) if "podSelector" in peer)


def check(overlay, objects):
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items(), f"{overlay}: selector does not match the pods"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    region = next(e["value"] for e in container["env"] if e["name"] == "BROKER__REGION")
    assert region == overlay.name, f"{overlay}: BROKER__REGION is {region}"
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    configmap = next(o for o in objects if o["kind"] == "ConfigMap")
    config = tomllib.loads(configmap["data"]["broker.toml"])
    drain = config["limits"]["drain_deadline_secs"]
    assert grace > pause + drain, f"{overlay}: the grace period ends before the drain"
    pod = deployment["spec"]["template"]
    assert pod["metadata"]["labels"].get(REGION_LABEL) == region, (
        f"{overlay}: pods lack {REGION_LABEL}={region}, which the scrape job makes `region`"
    )
    assert pod["spec"].get("automountServiceAccountToken") is False, (
        f"{overlay}: pods get a service account token (automountServiceAccountToken: false)"
    )
    check_secrets(overlay, container, config)
    check_trusted_proxies(overlay, config)
    check_metrics_port(overlay, objects, pod, container, config)
    check_network_policy(overlay, objects, pod, container)
    check_scrape_job(overlay, objects, pod)


def check_secrets(overlay, container, config):
    """Signing keys and passwords come from the Secret: neither the environment nor the ConfigMap
    holds one."""
    for env in container["env"]:
        if SECRET_ENV.search(env["name"]):
            assert "secretKeyRef" in env.get("valueFrom", {}), (
                f"{overlay}: {env['name']} is not from a Secret"
            )
    assert not config.get("token", {}).get("keys"), f"{overlay}: signing keys in the ConfigMap"
    redis = config.get("redis", {})
    assert "master_password" not in redis, f"{overlay}: the Redis password in the ConfigMap"
    urls = [redis.get("url", "")] + redis.get("sentinels", []) + redis.get("cluster_nodes", [])
    for url in urls:
        assert not re.match(r"^[a-z]+://[^/@]*:[^/@]*@", url), (
            f"{overlay}: a Redis password in the ConfigMap ({url.split('@')[-1]})"
        )


def check_trusted_proxies(overlay, config):
    """Behind an ingress, without trusted proxies every client is the ingress to the per-address
    rate limit."""
    proxies = config.get("trusted_proxies")
    assert proxies, f"{overlay}: no trusted_proxies: the ingress is every client's address"
    for proxy in proxies:
        ipaddress.ip_network(proxy, strict=False)


def check_metrics_port(overlay, objects, pod, container, config):
    """The annotations name the container port of the internal listener, and that port stays off
    the Service: metrics are for the scraper, not for the internet."""
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert METRICS_PORT_NAME in ports, f"{overlay}: no container port named {METRICS_PORT_NAME}"
    annotations = pod["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/scrape") == "true", f"{overlay}: pods not scraped"
    assert annotations.get("prometheus.io/path") == "/metrics", f"{overlay}: metrics path"
    port = annotations.get("prometheus.io/port")
    assert port == str(ports[METRICS_PORT_NAME]), (
        f"{overlay}: prometheus.io/port is {port}, the {METRICS_PORT_NAME} port is "
        f"{ports[METRICS_PORT_NAME]}"
    )
    for service in (o for o in objects if o["kind"] == "Service"):
        for p in service["spec"]["ports"]:
            assert p.get("targetPort") not in (METRICS_PORT_NAME, ports[METRICS_PORT_NAME]), (
                f"{overlay}: Service {service['metadata']['name']} exposes the metrics port"
            )
    # The internal listener is on loopback unless the settings say otherwise: it must be on that
    # port, reachable from the scraper and the kubelet, which probe it (the public port answers
    # 404 to probes).
    listen = config.get("internal_listen")
    assert listen, f"{overlay}: no internal_listen: on loopback, it cannot be scraped or probed"
    host, _, number = listen.rpartition(":")
    assert int(number) == ports[METRICS_PORT_NAME], f"{overlay}: internal_listen port"
    assert host not in ("127.0.0.1", "localhost", "[::1]"), (
        f"{overlay}: internal_listen on loopback cannot be scraped or probed"
    )
    for probe in ("livenessProbe", "readinessProbe"):
        target = container[probe]["httpGet"]["port"]
        assert target == METRICS_PORT_NAME, f"{overlay}: {probe} not on {METRICS_PORT_NAME}"


def check_network_policy(overlay, objects, pod, container):
    """A NetworkPolicy selects the pods, admits the internal port from named peers only, and
    lets them reach named ports only."""
    labels = pod["metadata"]["labels"]
    policies = [
        o for o in objects if o["kind"] == "NetworkPolicy"
        and o["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()
        and not o["spec"]["podSelector"].get("matchExpressions")
    ]
    assert policies, f"{overlay}: no NetworkPolicy selects the broker pods"
    internal = {METRICS_PORT_NAME, next(
        p["containerPort"] for p in container["ports"] if p["name"] == METRICS_PORT_NAME)}
    for policy in policies:
        name = policy["metadata"]["name"]
        spec = policy["spec"]
        assert {"Ingress", "Egress"} <= set(spec.get("policyTypes", [])), (
            f"{overlay}: NetworkPolicy {name} does not restrict both ingress and egress"
        )
        for rule in spec.get("ingress", []):
            ports = {p.get("port") for p in rule.get("ports", [])}
            admits_internal = not rule.get("ports") or ports & internal
            assert not admits_internal or rule.get("from"), (
                f"{overlay}: NetworkPolicy {name} admits the {METRICS_PORT_NAME} port from anywhere"
            )
        for rule in spec.get("egress", []):
            assert rule.get("ports"), f"{overlay}: NetworkPolicy {name} allows egress to any port"
        # A peer whose selector carries the pods' own labels (kustomize's includeSelectors adds
        # them to matchLabels) is a broker pod, never the Redis, DNS server or bot it names.
        for selector in list(network_policy_pod_selectors(policy))[1:]:
            shared = selector.get("matchLabels", {}).items() & labels.items()
            assert not shared, (
                f"{overlay}: NetworkPolicy {name} has a peer selected by the brokers' own labels "
                f"{dict(shared)}: use matchExpressions for peers"
            )


def check_scrape_job(overlay, objects, pod):
    """The example job keeps exactly these pods, on the metrics port, and labels their region."""
    job = next(j for j in yaml.safe_load(SCRAPE.read_text())["scrape_configs"]
               if j["job_name"] == "session-broker")
    namespace = objects[0]["metadata"]["namespace"]
    assert any(namespace in sd.get("namespaces", {}).get("names", [])
               for sd in job["kubernetes_sd_configs"]), f"{overlay}: namespace not scraped"
    meta = {f"__meta_kubernetes_pod_label_{sanitize(k)}": v
            for k, v in pod["metadata"]["labels"].items()}
    meta |= {f"__meta_kubernetes_pod_annotation_{sanitize(k)}": v
             for k, v in pod["metadata"]["annotations"].items()}
    meta["__meta_kubernetes_pod_container_port_name"] = METRICS_PORT_NAME
    targets = {}
    for rule in job["relabel_configs"]:
        value = ";".join(meta.get(s, "") for s in rule["source_labels"])
        if rule.get("action") == "keep":
            assert re.fullmatch(rule["regex"], value), f"{overlay}: the scrape job drops the pods"
        elif rule["target_label"] == "region":
            targets["region"] = value
    region = pod["metadata"]["labels"][REGION_LABEL]
    assert targets.get("region") == region, f"{overlay}: scraped region {targets.get('region')}"


def sanitize(name):
    """A Kubernetes label or annotation name as service discovery spells it in a meta label."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


overlays = sorted(p for p in (ROOT / "overlays").iterdir() if p.is_dir())
assert overlays, "no overlays"
for overlay in overlays:
    objects = render(overlay)
    check(overlay, objects)
    print(f"{overlay.relative_to(ROOT)}: {len(objects)} objects valid for Kubernetes {KUBERNETES_VERSION}")
sys.exit(0)
