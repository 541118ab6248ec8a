"""deploy/k8s, checked without a cluster, kubectl or the network.

Every YAML file under deploy/k8s parses and is used by a kustomization. Each deployable tree (base, the
overlays, the RayService variant) is rendered here in Python, as kustomize would (``resources`` and
``patches``: JSON 6902 patches and strategic-merge patches of maps, ``$patch: delete``; anything else in a
kustomization fails the test rather than being skipped). Then:

- KubeRay objects (RayCluster, RayService) validate against the openAPIV3Schema of the CRDs copied into
  deploy/k8s/schemas, made strict (an unknown field is an error here; the API server would drop it
  silently), plus the rules KubeRay's controller adds (min/max replicas, resource fields, auth version).
- Core objects are checked structurally: apiVersion, kind, metadata.name, spec; every Service, StatefulSet
  and NetworkPolicy selects some pod template; the ports that Services, probes and NetworkPolicies name
  exist on those pods; CPU and memory requests and limits are set and requests <= limits; ConfigMaps,
  keys and env vars that containers refer to exist.
- smcserve's own wiring: the head's ``smcserve serve`` command parses with the real CLI parser, with the
  ConfigMap's values, and agrees with the manifests (worker counts = group replicas, one worker per pod,
  threads within the pod's CPUs, the gRPC port, the Redis URL).

The negative tests break copies in memory and expect each mistake to be reported.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = K8S / "schemas"
TREES = ["base", "overlays/small", "overlays/large", "rayservice"]
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayService": "ray.io_rayservices.yaml"}
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# KubeRay injects these into the Ray containers; everything else a command uses must be defined in the pod
KUBERAY_ENV = {"KUBERAY_GEN_RAY_START_CMD", "RAY_ADDRESS", "RAY_PORT", "RAY_CLUSTER_NAME", "FQ_RAY_IP", "RAY_IP"}


class RenderError(Exception):
    pass


# --- loading and rendering (a small kustomize) --------------------------------------------------------------
def load_docs(path: Path) -> list:
    return [d for d in yaml.load_all(path.read_text(), Loader=_LOADER) if d is not None]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if SCHEMAS not in p.parents)


def _split_api_version(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


def _matches(doc: dict, target: dict) -> bool:
    group, version = _split_api_version(doc.get("apiVersion", ""))
    want = {"group": group, "version": version, "kind": doc.get("kind"), "name": doc.get("metadata", {}).get("name")}
    unknown = set(target) - set(want)
    if unknown:
        raise RenderError(f"patch target: unsupported keys {sorted(unknown)}")
    return all(want[k] == v for k, v in target.items())


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise RenderError(f"JSON pointer {path!r} must start with /")
    return [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]


def _step(node, token: str, path: str):
    if isinstance(node, list):
        if not token.isdigit() or int(token) >= len(node):
            raise RenderError(f"{path}: no list item {token}")
        return node[int(token)]
    if not isinstance(node, dict) or token not in node:
        raise RenderError(f"{path}: no field {token!r}")
    return node[token]


def apply_json6902(doc: dict, ops: list) -> dict:
    """``doc`` with the RFC 6902 operations ``ops`` applied (add, replace, remove, test)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        kind, path = op.get("op"), op.get("path", "")
        *parents, last = _pointer(path)
        node = doc
        for token in parents:
            node = _step(node, token, path)
        if kind == "test":
            if _step(node, last, path) != op["value"]:
                raise RenderError(f"test failed: {path} is {_step(node, last, path)!r}, not {op['value']!r}")
        elif kind == "replace":
            _step(node, last, path)  # must exist
            node[int(last) if isinstance(node, list) else last] = copy.deepcopy(op["value"])
        elif kind == "add":
            if isinstance(node, list):
                node.insert(len(node) if last == "-" else int(last), copy.deepcopy(op["value"]))
            else:
                node[last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            _step(node, last, path)
            del node[int(last) if isinstance(node, list) else last]
        else:
            raise RenderError(f"unsupported JSON patch op {kind!r}")
    return doc


def _merge(base, patch, path: str):
    if isinstance(patch, dict) and isinstance(base, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(base[k], v, f"{path}.{k}") if k in base else copy.deepcopy(v)
        return out
    if isinstance(patch, list):  # Kubernetes merges some lists by key: patch them with JSON 6902 instead
        raise RenderError(f"{path}: a strategic-merge patch of a list; use a JSON 6902 patch")
    return copy.deepcopy(patch)


def apply_strategic_merge(docs: list, patch: dict) -> list:
    """A strategic-merge patch of maps: merged into the object it names, or ``$patch: delete`` removes it."""
    key = (patch.get("kind"), patch.get("metadata", {}).get("name"))
    hits = [i for i, d in enumerate(docs) if (d.get("kind"), d.get("metadata", {}).get("name")) == key]
    if len(hits) != 1:
        raise RenderError(f"strategic-merge patch {key}: {len(hits)} objects match")
    body = {k: v for k, v in patch.items() if k != "$patch"}
    if patch.get("$patch") == "delete":
        return [d for i, d in enumerate(docs) if i != hits[0]]
    if "$patch" in patch:
        raise RenderError(f"unsupported $patch: {patch['$patch']!r}")
    out = list(docs)
    out[hits[0]] = _merge(docs[hits[0]], body, f"{key[0]}/{key[1]}")
    return out


def render(directory: Path) -> list:
    """The objects ``kubectl apply -k directory`` would send, as far as this test's kustomize goes."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - {"apiVersion", "kind", "resources", "patches"}
    if unknown:
        raise RenderError(f"{directory}: this test does not render {sorted(unknown)}; extend render() first")
    docs = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if K8S.resolve() not in path.parents:
            raise RenderError(f"{directory}: resource {entry} lies outside deploy/k8s")
        docs += render(path) if path.is_dir() else load_docs(path)
    for patch in kustomization.get("patches", []):
        if set(patch) - {"path", "target"}:
            raise RenderError(f"{directory}: unsupported patch keys {sorted(set(patch) - {'path', 'target'})}")
        body = yaml.safe_load((directory / patch["path"]).read_text())
        if isinstance(body, list):
            hits = [i for i, d in enumerate(docs) if _matches(d, patch.get("target") or {})]
            if not patch.get("target") or not hits:
                raise RenderError(f"{directory}: JSON 6902 patch {patch['path']} matches no object")
            for i in hits:
                docs[i] = apply_json6902(docs[i], body)
        else:
            if "target" in patch:
                raise RenderError(f"{directory}: {patch['path']}: a strategic-merge patch names its own object")
            docs = apply_strategic_merge(docs, body)
    return docs


@functools.cache
def rendered(tree: str) -> tuple:
    return tuple(render(K8S / tree))


# --- quantities ---------------------------------------------------------------------------------------------
_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3}


def quantity(value) -> float:
    """A Kubernetes quantity ("500m", "4Gi", 2) as a number (cores, bytes)."""
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    if not m or (m.group(2) and m.group(2) not in _SUFFIX):
        raise ValueError(f"not a quantity: {value!r}")
    return float(m.group(1)) * _SUFFIX.get(m.group(2), 1)


def redis_bytes(value: str) -> int:
    """A Redis / smcserve size ("2gb", "512mb", "1g")."""
    m = re.fullmatch(r"(\d+)\s*(b|kb?|mb?|gb?)?", value.strip().lower())
    if not m:
        raise ValueError(f"not a size: {value!r}")
    unit = (m.group(2) or "b").rstrip("b") or "b"
    return int(m.group(1)) * {"b": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit]


# --- KubeRay: schema and controller rules -------------------------------------------------------------------
def _strict(schema):
    """The schema with unknown fields rejected wherever it lists the known ones."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        if not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@functools.cache
def crd(kind: str) -> dict:
    return yaml.load((SCHEMAS / CRD_FILES[kind]).read_text(), Loader=_LOADER)


@functools.cache
def validator(kind: str, version: str) -> jsonschema.Draft4Validator:
    versions = {v["name"]: v for v in crd(kind)["spec"]["versions"] if v.get("served")}
    if version not in versions:
        raise KeyError(f"{kind}: the CRD serves no version {version!r} (it serves {sorted(versions)})")
    return jsonschema.Draft4Validator(_strict(versions[version]["schema"]["openAPIV3Schema"]))


def schema_errors(doc: dict) -> list[str]:
    group, version = _split_api_version(doc["apiVersion"])
    assert group == crd(doc["kind"])["spec"]["group"], doc["apiVersion"]
    errors = validator(doc["kind"], version).iter_errors(doc)
    return [f"{doc['kind']}/{doc['metadata'].get('name')}: {'.'.join(map(str, e.path))}: {e.message}" for e in errors]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterConfig"] if doc["kind"] == "RayService" else doc["spec"]


def kuberay_problems(doc: dict) -> list[str]:
    """What KubeRay's controller refuses (utils.ValidateRayClusterSpec / ValidateRayServiceSpec), in part."""
    where = f"{doc['kind']}/{doc['metadata']['name']}"
    name = doc["metadata"]["name"]
    problems = []
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name):
        problems.append(f"{where}: the name is not a DNS-1035 label")
    spec = cluster_spec(doc)
    autoscaling = spec.get("enableInTreeAutoscaling", False)
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    if len({g for g, _ in groups}) != len(groups):
        problems.append(f"{where}: group names repeat")
    for group, g in groups:
        if not g["template"]["spec"].get("containers"):
            problems.append(f"{where}: {group}: no container")
        params = g.get("rayStartParams", {})
        if "labels" in params:
            problems.append(f"{where}: {group}: rayStartParams labels (KubeRay wants the labels field)")
        if g.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            problems.append(f"{where}: {group}: resources in both rayStartParams and resources")
        if group == "head":
            continue
        lo, hi, n = g.get("minReplicas"), g.get("maxReplicas"), g.get("replicas", 0)
        if not autoscaling and (lo is None or hi is None):
            problems.append(f"{where}: {group}: minReplicas and maxReplicas are required without autoscaling")
        elif not 0 <= (lo or 0) <= n <= (hi if hi is not None else n):
            problems.append(f"{where}: {group}: replicas {n} not within [{lo}, {hi}]")
    if spec.get("authOptions", {}).get("mode") == "token" and _version(spec.get("rayVersion", "0")) < (2, 52, 0):
        problems.append(f"{where}: authOptions.mode token needs rayVersion >= 2.52.0")
    if doc["kind"] == "RayService" and spec["headGroupSpec"].get("headService", {}).get("metadata", {}).get("name"):
        problems.append(f"{where}: a RayService's headService must not be named")
    return problems


# --- core objects: structure and references -----------------------------------------------------------------
def pod_templates(docs) -> list[tuple[str, dict]]:
    """(owner, pod template) for every pod the objects would run."""
    out = []
    for d in docs:
        where = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            out.append((where, d["spec"]["template"]))
        elif d["kind"] in ("RayCluster", "RayService"):
            spec = cluster_spec(d)
            out.append((f"{where} head", spec["headGroupSpec"]["template"]))
            out += [(f"{where} {g['groupName']}", g["template"]) for g in spec.get("workerGroupSpecs", [])]
    return out


def _labels(template: dict) -> dict:
    return template.get("metadata", {}).get("labels", {})


def _selects(selector: dict, labels: dict) -> bool:
    """A label selector (matchLabels/matchExpressions, or a Service's plain map) against labels."""
    if not selector:
        return False
    plain = selector if "matchLabels" not in selector and "matchExpressions" not in selector else None
    match = plain if plain is not None else selector.get("matchLabels", {})
    if any(labels.get(k) != v for k, v in match.items()):
        return False
    for e in [] if plain is not None else selector.get("matchExpressions", []):
        op, have = e["operator"], labels.get(e["key"])
        ok = {
            "In": have in e.get("values", []),
            "NotIn": have not in e.get("values", []),
            "Exists": e["key"] in labels,
            "DoesNotExist": e["key"] not in labels,
        }[op]
        if not ok:
            return False
    return True


def _containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return spec.get("containers", []) + spec.get("initContainers", [])


def _has_port(containers: list[dict], port) -> bool:
    ports = [p for c in containers for p in c.get("ports", [])]
    if isinstance(port, str) and not port.isdigit():
        return any(p.get("name") == port for p in ports)
    return any(p["containerPort"] == int(port) for p in ports)


def container_env(container: dict, docs) -> dict[str, str]:
    """The container's environment: its ConfigMaps' data and its env values (a Secret's as "<secret>")."""
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    env = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            env.update(maps.get(src["configMapRef"]["name"], {}))
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("configMapKeyRef")
        env[e["name"]] = maps.get(ref["name"], {}).get(ref["key"], "") if ref else e.get("value", "<secret>")
    return env


def core_problems(docs) -> list[str]:
    problems = []
    seen = set()
    names = {(d.get("kind"), d.get("metadata", {}).get("name")) for d in docs}
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d.get("kind") == "ConfigMap"}
    for d in docs:
        where = f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"
        for field in ("apiVersion", "kind"):
            if not d.get(field):
                problems.append(f"{where}: no {field}")
        if not d.get("metadata", {}).get("name"):
            problems.append(f"{where}: no metadata.name")
        if d.get("kind") in ("ConfigMap", "Secret"):
            if "data" not in d and "stringData" not in d:
                problems.append(f"{where}: no data")
        elif not d.get("spec"):
            problems.append(f"{where}: no spec")
        key = (d.get("kind"), d.get("metadata", {}).get("name"))
        if key in seen:
            problems.append(f"{where}: defined twice")
        seen.add(key)
    if problems:
        return problems

    templates = pod_templates(docs)
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for name, svc in services.items():
        selected = [t for _, t in templates if _selects(svc["spec"].get("selector", {}), _labels(t))]
        if not selected:
            problems.append(f"Service/{name}: selector {svc['spec'].get('selector')} matches no pod template")
        for p in svc["spec"].get("ports", []):
            target = p.get("targetPort", p["port"])
            if len(svc["spec"]["ports"]) > 1 and not p.get("name"):
                problems.append(f"Service/{name}: port {p['port']} has no name")
            for t in selected:
                if not _has_port(_containers(t), target):
                    problems.append(f"Service/{name}: targetPort {target!r} is not a port of the pods it selects")

    for d in docs:
        where = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "StatefulSet"):
            if not _selects(d["spec"]["selector"], _labels(d["spec"]["template"])):
                problems.append(f"{where}: selector does not match its pod template's labels")
        if d["kind"] == "StatefulSet":
            svc = services.get(d["spec"].get("serviceName"))
            if svc is None or svc["spec"].get("clusterIP") != "None":
                problems.append(f"{where}: serviceName names no headless Service")
            elif not _selects(svc["spec"]["selector"], _labels(d["spec"]["template"])):
                problems.append(f"{where}: its headless Service does not select its pods")
        if d["kind"] == "NetworkPolicy":
            targets = [t for _, t in templates if _selects(d["spec"]["podSelector"], _labels(t))]
            if not targets:
                problems.append(f"{where}: podSelector matches no pod template")
            for rule in d["spec"].get("ingress", []):
                for peer in rule.get("from", []):
                    if "podSelector" in peer and not any(
                        _selects(peer["podSelector"], _labels(t)) for _, t in templates
                    ):
                        problems.append(f"{where}: a from.podSelector matches no pod template")
                for p in rule.get("ports", []):
                    if not all(_has_port(_containers(t), p["port"]) for t in targets):
                        problems.append(f"{where}: port {p['port']} is not a port of the pods it guards")

    for owner, t in templates:
        for c in _containers(t):
            where = f"{owner} container {c['name']}"
            if not c.get("image"):
                problems.append(f"{where}: no image")
            port_names = [p["name"] for p in c.get("ports", []) if "name" in p]
            if len(port_names) != len(set(port_names)):
                problems.append(f"{where}: port names repeat")
            res = c.get("resources", {})
            for kind in ("cpu", "memory"):
                req, lim = res.get("requests", {}).get(kind), res.get("limits", {}).get(kind)
                if req is None or lim is None:
                    problems.append(f"{where}: {kind} request and limit must both be set")
                elif quantity(req) > quantity(lim):
                    problems.append(f"{where}: {kind} request {req} > limit {lim}")
            for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(probe_name)
                if not probe:
                    continue
                for handler in ("httpGet", "tcpSocket", "grpc"):
                    if handler in probe and not _has_port([c], probe[handler]["port"]):
                        problems.append(
                            f"{where}: {probe_name} port {probe[handler]['port']!r} is not a container port"
                        )
                if "grpc" in probe and not isinstance(probe["grpc"]["port"], int):
                    problems.append(f"{where}: {probe_name}: a grpc probe's port is a number")
            for src in c.get("envFrom", []):
                if "configMapRef" in src and (src["configMapRef"]["name"] not in maps):
                    problems.append(f"{where}: envFrom names no ConfigMap {src['configMapRef']['name']}")
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    m = ref["configMapKeyRef"]
                    if m["key"] not in maps.get(m["name"], {}) and not m.get("optional"):
                        problems.append(f"{where}: env {e['name']}: no key {m['key']} in ConfigMap {m['name']}")
                if "secretKeyRef" in ref:
                    s = ref["secretKeyRef"]
                    if ("Secret", s["name"]) not in names and not s.get("optional"):
                        problems.append(f"{where}: env {e['name']}: Secret {s['name']} is not deployed nor optional")
            defined = {e["name"] for e in c.get("env", [])}
            for var in re.findall(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", " ".join(c.get("command", []) + c.get("args", []))
            ):
                if var not in defined:
                    problems.append(f"{where}: $({var}) is not an env var of the container")
    return problems


# --- smcserve's wiring --------------------------------------------------------------------------------------
@functools.cache
def serve_parser():
    from smcserve.entrypoints.cli import build_parser

    return build_parser(only=["serve"])


def serve_args(script: str, env: dict[str, str]):
    """The head script's ``smcserve serve`` arguments, with the environment's values, parsed by the CLI."""
    m = re.search(r"exec smcserve (serve\b.*)", script.replace("\\\n", " "), re.S)
    if not m:
        raise AssertionError("the head's command does not exec `smcserve serve`")
    line = re.sub(r'"?\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?"?', lambda v: shlex.quote(env[v.group(1)]), m.group(1))
    return serve_parser().parse_args(shlex.split(line))


def smcserve_problems(docs) -> list[str]:
    problems = []
    clusters = [d for d in docs if d["kind"] in ("RayCluster", "RayService")]
    if len(clusters) != 1:
        return [f"{len(clusters)} Ray clusters rendered, not one"]
    spec = cluster_spec(clusters[0])
    head = spec["headGroupSpec"]
    c = head["template"]["spec"]["containers"][0]
    env = container_env(c, docs)
    script = "\n".join(c.get("args", []))
    if head["template"].get("metadata", {}).get("annotations", {}).get("ray.io/overwrite-container-cmd") != "true":
        problems.append("head: without ray.io/overwrite-container-cmd KubeRay appends `ray start --block`")
    if "${KUBERAY_GEN_RAY_START_CMD/--block/}" not in script:
        problems.append("head: the script must run KubeRay's `ray start` without --block before the scheduler")
    for var in set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", script)) - set(env) - KUBERAY_ENV:
        problems.append(f"head: the script uses ${var}, which the container does not define")
    if problems:
        return problems
    args = serve_args(script, env)
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    grpc_ports = [p["containerPort"] for p in c["ports"] if p.get("name") == "grpc"]
    if args.ray_address != "auto" or args.host != "0.0.0.0":
        problems.append(f"head: serve --ray-address {args.ray_address} --host {args.host} (want auto, 0.0.0.0)")
    if grpc_ports != [args.port]:
        problems.append(f"head: serve --port {args.port} but the container's grpc port is {grpc_ports}")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if c.get(probe, {}).get("grpc", {}).get("port") != args.port:
            problems.append(f"head: {probe} is not a grpc probe of port {args.port}")
    http_ports = [p["containerPort"] for p in c["ports"] if p.get("name") == "http"]
    if hasattr(args, "http_port") and (not args.http or http_ports != [args.http_port]):
        problems.append(f"head: the HTTP front (--http-port {args.http_port}) is not the container's http port")
    if args.dtype == "auto":
        problems.append("head: --dtype auto would time dtypes on the head, which runs no worker")
    if head.get("rayStartParams", {}).get("num-cpus") != "0":
        problems.append("head: rayStartParams num-cpus must be 0 (no worker on the scheduler's pod)")
    for pool, count in (("prefill", args.prefill_workers), ("decode", args.decode_workers)):
        g = groups.get(pool)
        if g is None:
            problems.append(f"no worker group {pool}")
            continue
        if g.get("replicas") != count:
            problems.append(f"{pool}: {count} workers (--{pool}-workers) but {g.get('replicas')} pods")
        if float(g.get("rayStartParams", {}).get("num-cpus", "nan")) != args.worker_cpus:
            problems.append(f"{pool}: each pod must offer Ray --worker-cpus ({args.worker_cpus}) CPUs: one worker")
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        if not 1 <= args.threads <= quantity(limits["cpu"]):
            problems.append(f"{pool}: --threads {args.threads} not within the pods' {limits['cpu']} CPUs")
        if redis_bytes(args.kv_cache) > quantity(limits["memory"]) / 2:
            problems.append(f"{pool}: --kv-cache {args.kv_cache} leaves too little of {limits['memory']}")
    m = re.fullmatch(r"redis://(?:[^@]*@)?([^:/]+):(\d+)", args.redis_url or "")
    sets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "StatefulSet"}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    if not m:
        problems.append(f"--redis-url {args.redis_url!r}")
    else:
        host, port = m.group(1), int(m.group(2))
        pod, _, svc = host.partition(".")
        sts = sets.get(pod.rpartition("-")[0])
        if sts is None or sts["spec"]["serviceName"] != svc or not pod.endswith("-0"):
            problems.append(f"--redis-url host {host} is not <statefulset>-0.<its headless service>")
        elif port not in [p["port"] for p in services[svc]["spec"]["ports"]]:
            problems.append(f"--redis-url port {port} is not a port of Service/{svc}")
        else:
            redis = sts["spec"]["template"]["spec"]["containers"][0]
            flags = redis.get("args", [])
            i = flags.index("--maxmemory") if "--maxmemory" in flags else -1
            if i < 0 or flags[i + 1 : i + 2] != ["$(REDIS_MAXMEMORY)"]:
                problems.append("Redis is not started with --maxmemory $(REDIS_MAXMEMORY)")
            cap = redis_bytes(container_env(redis, docs)["REDIS_MAXMEMORY"])
            if cap >= quantity(redis["resources"]["limits"]["memory"]):
                problems.append(f"REDIS_MAXMEMORY {cap} B does not fit the Redis container's memory limit")
    return problems


# --- the tests ----------------------------------------------------------------------------------------------
def test_every_yaml_parses_and_is_used():
    used = set()
    for k in K8S.rglob("kustomization.yaml"):
        body = yaml.safe_load(k.read_text())
        used.add(k)
        used |= {(k.parent / e).resolve() for e in body.get("resources", [])}
        used |= {(k.parent / p["path"]).resolve() for p in body.get("patches", [])}
    files = manifest_files()
    assert len(files) >= 10
    for path in files:
        docs = load_docs(path)
        assert docs, f"{path}: empty"
        assert path in used or path.resolve() in used, f"{path.relative_to(ROOT)}: no kustomization uses it"


def test_schemas_are_the_recorded_copies():
    readme = (SCHEMAS / "README.md").read_text()
    for name in CRD_FILES.values():
        digest = hashlib.sha256((SCHEMAS / name).read_bytes()).hexdigest()
        assert f"{digest}  {name}" in readme, f"{name}: its sha256 is not the one deploy/k8s/schemas/README.md records"


@pytest.mark.parametrize("tree", TREES)
def test_tree_renders_and_validates(tree):
    docs = rendered(tree)
    kinds = sorted(d["kind"] for d in docs)
    ray_kind = "RayService" if tree == "rayservice" else "RayCluster"
    assert kinds == sorted(["ConfigMap", "NetworkPolicy", ray_kind, "Service", "Service", "Service", "StatefulSet"])
    for d in docs:
        if d["kind"] in CRD_FILES:
            assert schema_errors(d) == []
            assert kuberay_problems(d) == []
    assert core_problems(docs) == []
    assert smcserve_problems(docs) == []


def test_overlays_size_the_pools():
    def sizes(tree):
        docs = rendered(tree)
        spec = cluster_spec(next(d for d in docs if d["kind"] in CRD_FILES))
        return {g["groupName"]: g["replicas"] for g in spec["workerGroupSpecs"]}

    assert sizes("base") == {"prefill": 1, "decode": 1}
    assert sizes("overlays/small") == {"prefill": 1, "decode": 2}
    assert sizes("overlays/large") == {"prefill": 4, "decode": 8}


def test_rayservice_runs_the_base_cluster():
    base = next(d for d in rendered("base") if d["kind"] == "RayCluster")
    service = next(d for d in rendered("rayservice") if d["kind"] == "RayService")
    assert service["spec"]["rayClusterConfig"] == base["spec"]
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve == {"proxy_location": "Disabled", "applications": []}  # no Serve app, port 8000 left to smcserve


# --- negative checks: each mistake is reported ---------------------------------------------------------------
def _raycluster() -> dict:
    return copy.deepcopy(next(d for d in rendered("overlays/small") if d["kind"] == "RayCluster"))


def _break_replicas_type(d):
    d["spec"]["workerGroupSpecs"][1]["replicas"] = "two"


def _break_field_name(d):
    d["spec"]["headGroupSpec"]["rayStartParam"] = d["spec"]["headGroupSpec"].pop("rayStartParams")


def _break_required(d):
    del d["spec"]["headGroupSpec"]["template"]


def _break_quantity(d):
    d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "two"


def _break_auth_mode(d):
    d["spec"]["authOptions"]["mode"] = "password"


@pytest.mark.parametrize(
    "breaker", [_break_replicas_type, _break_field_name, _break_required, _break_quantity, _break_auth_mode]
)
def test_schema_rejects_a_broken_raycluster(breaker):
    d = _raycluster()
    assert schema_errors(d) == []
    breaker(d)
    assert schema_errors(d), f"{breaker.__name__}: the schema accepted it"


def _edit(tree, kind, name, edit):
    docs = [copy.deepcopy(d) for d in rendered(tree)]
    edit(next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name))
    return docs


def _worker(d, i=0):
    return d["spec"]["workerGroupSpecs"][i]["template"]["spec"]["containers"][0]


def _head(d):
    return d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize(
    "kind, name, edit, check, says",
    [
        ("Service", "smcserve", lambda d: d["spec"]["selector"].update(component="x"), core_problems, "matches no pod"),
        (
            "Service",
            "smcserve-metrics",
            lambda d: d["spec"]["ports"][0].update(targetPort="metric"),
            core_problems,
            "targetPort",
        ),
        (
            "RayCluster",
            "smcserve",
            lambda d: _worker(d)["resources"]["requests"].update(cpu="4"),
            core_problems,
            "cpu request 4 > limit",
        ),
        (
            "RayCluster",
            "smcserve",
            lambda d: _worker(d, 1)["resources"].pop("limits"),
            core_problems,
            "limit must both be set",
        ),
        (
            "RayCluster",
            "smcserve",
            lambda d: _head(d)["readinessProbe"]["grpc"].update(port=50052),
            core_problems,
            "readinessProbe port 50052",
        ),
        (
            "StatefulSet",
            "smcserve-redis",
            lambda d: d["spec"].update(serviceName="redis"),
            core_problems,
            "no headless Service",
        ),
        (
            "NetworkPolicy",
            "smcserve-redis",
            lambda d: d["spec"]["podSelector"]["matchLabels"].update(x="y"),
            core_problems,
            "matches no pod template",
        ),
        (
            "ConfigMap",
            "smcserve-config",
            lambda d: d["data"].update(DECODE_WORKERS="3"),
            smcserve_problems,
            "3 workers (--decode-workers) but 2 pods",
        ),
        (
            "ConfigMap",
            "smcserve-config",
            lambda d: d["data"].update(SMCSERVE_THREADS="4"),
            smcserve_problems,
            "--threads 4",
        ),
        ("ConfigMap", "smcserve-config", lambda d: d["data"].pop("REDIS_URL"), smcserve_problems, "$REDIS_URL"),
        (
            "ConfigMap",
            "smcserve-config",
            lambda d: d["data"].update(REDIS_URL="redis://redis:6379"),
            smcserve_problems,
            "is not <statefulset>-0",
        ),
        (
            "ConfigMap",
            "smcserve-config",
            lambda d: d["data"].update(REDIS_MAXMEMORY="3gb"),
            smcserve_problems,
            "REDIS_MAXMEMORY",
        ),
        (
            "RayCluster",
            "smcserve",
            lambda d: d["spec"]["workerGroupSpecs"][0].update(replicas=20),
            kuberay_problems,
            "not within",
        ),
        ("RayCluster", "smcserve", lambda d: d["spec"].update(rayVersion="2.40.0"), kuberay_problems, "2.52.0"),
        (
            "StatefulSet",
            "smcserve-redis",
            lambda d: d["spec"]["template"]["spec"]["containers"][0]["args"].remove("--maxmemory"),
            smcserve_problems,
            "--maxmemory",
        ),
    ],
)
def test_checks_report_a_mistake(kind, name, edit, check, says):
    docs = _edit("overlays/small", kind, name, edit)
    ray = next(d for d in docs if d["kind"] == "RayCluster")
    problems = check(ray) if check is kuberay_problems else check(docs)
    assert any(says in p for p in problems), problems


def test_a_serve_flag_the_cli_does_not_know_fails():
    docs = _edit("base", "RayCluster", "smcserve", lambda d: _head(d).update(args=[_head(d)["args"][0] + " --bogus 1"]))
    with pytest.raises(SystemExit):
        smcserve_problems(docs)


def test_render_refuses_what_it_cannot_apply(tmp_path):
    doc = {"spec": {"workerGroupSpecs": [{"groupName": "prefill", "replicas": 1}]}}
    with pytest.raises(RenderError, match="test failed"):
        apply_json6902(doc, [{"op": "test", "path": "/spec/workerGroupSpecs/0/groupName", "value": "decode"}])
    with pytest.raises(RenderError, match="no list item"):
        apply_json6902(doc, [{"op": "replace", "path": "/spec/workerGroupSpecs/1/replicas", "value": 2}])
    with pytest.raises(RenderError, match="list"):
        apply_strategic_merge(
            [{"kind": "X", "metadata": {"name": "a"}, "l": [1]}], {"kind": "X", "metadata": {"name": "a"}, "l": [2]}
        )
    (tmp_path / "kustomization.yaml").write_text("resources: []\nimages: [{name: smcserve, newTag: v1}]\n")
    with pytest.raises(RenderError, match="images"):
        render(tmp_path)
