#!/usr/bin/env bash
# Offline check of the Kubernetes manifests: renders k8s/overlays/{dev,prod} with `kubectl kustomize` and checks
# every rendered document with python3 + PyYAML for the fields the deployment relies on (k8s/README.md). With
# python3-kubernetes present it also checks every key against the API's object models (typos, wrong scalar types).
# Needs no cluster and installs nothing; prints what is missing (Debian 12: kubernetes-client, python3-yaml;
# optional python3-kubernetes).
#
#   bash scripts/check-k8s.sh
#   KUBECTL="kubectl /opt/kubectl-1.29" bash scripts/check-k8s.sh   # several kubectls: each must render, and
#                                                                    # all must render the same objects
# Exit status: 0 all good, 1 a check failed, 2 a prerequisite is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

read -r -a kubectls <<<"${KUBECTL:-kubectl}"
missing=()
for k in "${kubectls[@]}"; do
  command -v "$k" >/dev/null 2>&1 || missing+=("$k (Debian: apt-get install kubernetes-client)")
done
command -v python3 >/dev/null 2>&1 || missing+=("python3 (apt-get install python3)")
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import yaml' 2>/dev/null; then
  missing+=("PyYAML for $(command -v python3) (apt-get install python3-yaml)")
fi
if [ ${#missing[@]} -gt 0 ]; then
  printf 'check-k8s: missing: %s\n' "${missing[@]}" >&2
  exit 2
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
overlays=(dev prod prod-monitoring)
rendered=()
for o in "${overlays[@]}"; do
  i=0
  for k in "${kubectls[@]}"; do
    out="$tmp/$o.$i.yaml"
    # Deprecation warnings of newer kustomize go to stderr and are shown; a failed render stops the check.
    if ! "$k" kustomize "k8s/overlays/$o" >"$out" 2>"$tmp/err"; then
      echo "check-k8s: FAIL: $k kustomize k8s/overlays/$o:" >&2
      cat "$tmp/err" >&2
      exit 1
    fi
    grep -v "deprecated" "$tmp/err" >&2 || true
    echo "check-k8s: rendered k8s/overlays/$o with $k ($(grep -c '^kind:' "$out") objects)"
    rendered+=("$o=$out")
    i=$((i + 1))
  done
done

python3 - "${rendered[@]}" <<'PY'
import re
import sys

import yaml

CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding"}
LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/component", "app.kubernetes.io/part-of")
failures = []


def fail(overlay, msg):
    failures.append(f"{overlay}: {msg}")


def quantity(q):
    """A Kubernetes quantity as a float (cores or bytes)."""
    m = re.fullmatch(r"([0-9.]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?", str(q))
    if not m:
        raise ValueError(f"bad quantity {q!r}")
    scale = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[m.group(2)]
    return float(m.group(1)) * scale


def flag(args, name):
    """The value after `--name` (or of `--name=value`) in a container's args, else None."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def expand(value, env):
    """Kubernetes' $(VAR) expansion of args against literal env values."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: str(env[m.group(1)]["value"]) if "value" in env.get(m.group(1), {}) else m.group(0),
                  value)


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_pod(o, what, pod, containers_expected, objs):
    """Security, resources and the models volume of one pod template."""
    spec = pod["spec"]
    labels = pod.get("metadata", {}).get("labels", {})
    for l in LABELS:
        if l not in labels:
            fail(o, f"{what}: pod template lacks label {l}")
    psc = spec.get("securityContext", {})
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        fail(o, f"{what}: pod seccompProfile is not RuntimeDefault")
    if spec.get("automountServiceAccountToken") is not False:
        fail(o, f"{what}: automountServiceAccountToken is not false")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    names = [c["name"] for c in spec["containers"]]
    if names != containers_expected:
        fail(o, f"{what}: containers {names}, expected {containers_expected}")
    for c in spec["containers"]:
        cw = f"{what}/{c['name']}"
        csc = c.get("securityContext", {})
        if not (csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True):
            fail(o, f"{cw}: runAsNonRoot is not true")
        if csc.get("runAsUser", psc.get("runAsUser")) in (None, 0):
            fail(o, f"{cw}: runAsUser unset or 0 (runAsNonRoot cannot check a named USER)")
        if csc.get("allowPrivilegeEscalation") is not False:
            fail(o, f"{cw}: allowPrivilegeEscalation is not false")
        if csc.get("readOnlyRootFilesystem") is not True:
            fail(o, f"{cw}: readOnlyRootFilesystem is not true")
        if csc.get("capabilities", {}).get("drop") != ["ALL"]:
            fail(o, f"{cw}: capabilities.drop is not [ALL]")
        res = c.get("resources", {})
        for kind in ("cpu", "memory"):
            req, lim = res.get("requests", {}).get(kind), res.get("limits", {}).get(kind)
            if req is None or lim is None:
                fail(o, f"{cw}: resources.requests/limits.{kind} missing")
            elif quantity(req) > quantity(lim):
                fail(o, f"{cw}: {kind} request {req} > limit {lim}")
        if not c.get("image"):
            fail(o, f"{cw}: no image")
        mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
        m = mounts.get("/models")
        if not m or m.get("readOnly") is not True:
            fail(o, f"{cw}: /models is not mounted read-only")
            continue
        v = volumes.get(m["name"], {})
        claim = v.get("persistentVolumeClaim", {})
        if claim.get("claimName") != "qforge-models" or claim.get("readOnly") is not True:
            fail(o, f"{cw}: /models is not the qforge-models claim, read-only ({v})")
        pvc = objs.get(("PersistentVolumeClaim", "qforge-models"))
        if not pvc or "ReadOnlyMany" not in pvc["spec"].get("accessModes", []):
            fail(o, f"{cw}: no ReadOnlyMany PersistentVolumeClaim qforge-models")
        if len([x for x in v if x != "name"]) != 1:
            fail(o, f"{cw}: models volume has several sources: {sorted(v)}")


def check(o, docs):
    objs = {}
    for d in docs:
        if not isinstance(d, dict) or not d.get("kind") or not d.get("apiVersion") or \
                not d.get("metadata", {}).get("name"):
            fail(o, f"document without apiVersion/kind/metadata.name: {d!r:.120}")
            continue
        key = (d["kind"], d["metadata"]["name"])
        if key in objs:
            fail(o, f"duplicate {key}")
        objs[key] = d
    namespaces = [n for (k, n) in objs if k == "Namespace"]
    if len(namespaces) != 1:
        fail(o, f"expected one Namespace, got {namespaces}")
        return objs
    ns = namespaces[0]
    for (k, n), d in objs.items():
        if k in CLUSTER_SCOPED:
            if d["metadata"].get("namespace"):
                fail(o, f"{k}/{n}: cluster-scoped object has a namespace")
        elif d["metadata"].get("namespace") != ns:
            fail(o, f"{k}/{n}: namespace {d['metadata'].get('namespace')!r}, expected {ns!r}")
        if k != "Namespace":
            for l in LABELS:
                if l not in d["metadata"].get("labels", {}):
                    fail(o, f"{k}/{n}: lacks label {l}")

    # --- PodMonitors (k8s/monitoring): each selects one workload's pods, names a port they open, and sets the
    # job label the Prometheus rules and dashboards expect.
    monitors = [(n, d) for (k, n), d in objs.items() if k == "PodMonitor"]
    if o.endswith("-monitoring") and len(monitors) != 3:
        fail(o, f"expected PodMonitors for scheduler, worker and server, got {[n for n, _ in monitors]}")
    for n, d in monitors:
        sel = d["spec"].get("selector", {}).get("matchLabels")
        pods = [w["spec"]["template"] for (wk, wn), w in objs.items()
                if wk in ("Deployment", "StatefulSet") and selects(sel, w["spec"]["template"]["metadata"]["labels"])]
        if len(pods) != 1:
            fail(o, f"PodMonitor/{n} selects {len(pods)} workloads, expected 1")
            continue
        ports = {p.get("name") for c in pods[0]["spec"]["containers"] for p in c.get("ports", [])}
        component = pods[0]["metadata"]["labels"].get("app.kubernetes.io/component")
        for e in d["spec"].get("podMetricsEndpoints", []):
            if e.get("port") not in ports:
                fail(o, f"PodMonitor/{n}: port {e.get('port')!r} is not one of the pods' ports {sorted(ports)}")
            jobs = [r.get("replacement") for r in e.get("relabelings", []) if r.get("targetLabel") == "job"]
            if jobs != [f"qforge-{component}"]:
                fail(o, f"PodMonitor/{n}: job label {jobs}, expected qforge-{component}")

    # --- scheduler ---
    sts = objs.get(("StatefulSet", "qforge-scheduler"))
    if not sts:
        fail(o, "no StatefulSet qforge-scheduler")
    else:
        s = sts["spec"]
        tmpl = s["template"]
        tl = tmpl["metadata"]["labels"]
        if s.get("replicas") != 1:
            fail(o, f"scheduler replicas {s.get('replicas')}: the store allows exactly one process")
        if not selects(s["selector"].get("matchLabels"), tl):
            fail(o, "scheduler selector does not match its pod labels")
        if tl.get("app.kubernetes.io/component") != "scheduler":
            fail(o, "scheduler pods are not component=scheduler")
        check_pod(o, "StatefulSet/qforge-scheduler", tmpl, ["scheduler"], objs)
        c = tmpl["spec"]["containers"][0]
        args = c.get("args", [])
        if c.get("command", [None])[0] != "qforge-scheduler":
            fail(o, "scheduler command is not qforge-scheduler")
        store = flag(args, "--store") or ""
        if not store.startswith("/var/lib/qforge"):
            fail(o, f"--store {store!r} is not on the /var/lib/qforge volume")
        if flag(args, "--allowed-roots") != "/models":
            fail(o, "scheduler --allowed-roots is not /models")
        if not (flag(args, "--listen") or "").endswith(":7700"):
            fail(o, "scheduler does not --listen on port 7700")
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        if ports.get("grpc") != 7700:
            fail(o, "scheduler has no container port grpc=7700")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            p = c.get(probe, {}).get("tcpSocket", {}).get("port")
            if p not in ("grpc", 7700):
                fail(o, f"scheduler {probe} is not a TCP probe on 7700")
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        vct = {t["metadata"]["name"]: t for t in s.get("volumeClaimTemplates", [])}
        if mounts.get("/var/lib/qforge") not in vct:
            fail(o, "/var/lib/qforge is not a volumeClaimTemplate")
        else:
            t = vct[mounts["/var/lib/qforge"]]["spec"]
            if "ReadWriteOnce" not in t.get("accessModes", []) and "ReadWriteOncePod" not in t.get("accessModes", []):
                fail(o, "store claim is not ReadWriteOnce(Pod)")
            if quantity(t["resources"]["requests"]["storage"]) <= 0:
                fail(o, "store claim has no size")
        if tmpl["spec"].get("terminationGracePeriodSeconds", 30) < 30:
            fail(o, "scheduler terminationGracePeriodSeconds < 30")
        if tmpl["spec"].get("securityContext", {}).get("fsGroup") is None:
            fail(o, "scheduler pod has no fsGroup: the store volume may not be writable for a non-root user")
        headless = objs.get(("Service", s.get("serviceName")))
        if not headless or headless["spec"].get("clusterIP") != "None":
            fail(o, f"serviceName {s.get('serviceName')!r} is not a headless Service")
        svc = objs.get(("Service", "qforge-scheduler"))
        if not svc or svc["spec"].get("clusterIP") == "None" or svc["spec"].get("type", "ClusterIP") != "ClusterIP":
            fail(o, "no ClusterIP Service qforge-scheduler")
        for sv in (svc, headless):
            if not sv:
                continue
            name = sv["metadata"]["name"]
            if not selects(sv["spec"].get("selector"), tl):
                fail(o, f"Service {name} does not select the scheduler pods")
            sp = {p["port"]: p.get("targetPort") for p in sv["spec"].get("ports", [])}
            if sp.get(7700) not in ("grpc", 7700):
                fail(o, f"Service {name} does not expose 7700 -> grpc")
        pdb = [d for (k, _), d in objs.items() if k == "PodDisruptionBudget"
               and selects(d["spec"]["selector"].get("matchLabels"), tl)]
        if len(pdb) != 1:
            fail(o, f"expected one PodDisruptionBudget for the scheduler, got {len(pdb)}")
        else:
            p = pdb[0]["spec"]
            if p.get("maxUnavailable") in (0, "0", "0%") or \
                    ("minAvailable" in p and p["minAvailable"] not in (0, "0", "0%")):
                fail(o, "scheduler PDB allows no disruption: it would block node drains forever (1 replica)")

    # --- workers ---
    dep = objs.get(("Deployment", "qforge-worker"))
    if not dep:
        fail(o, "no Deployment qforge-worker")
    else:
        s = dep["spec"]
        tmpl = s["template"]
        tl = tmpl["metadata"]["labels"]
        if not selects(s["selector"].get("matchLabels"), tl):
            fail(o, "worker selector does not match its pod labels")
        if sts and selects(s["selector"]["matchLabels"], sts["spec"]["template"]["metadata"]["labels"]):
            fail(o, "worker selector also selects scheduler pods")
        check_pod(o, "Deployment/qforge-worker", tmpl, ["worker"], objs)
        c = tmpl["spec"]["containers"][0]
        env = {e["name"]: e for e in c.get("env", [])}
        args = [expand(a, env) for a in c.get("args", [])]
        if c.get("command", [None])[0] != "qforge-worker":
            fail(o, "worker command is not qforge-worker")
        if flag(args, "--scheduler") != "qforge-scheduler:7700":
            fail(o, f"worker --scheduler is {flag(args, '--scheduler')!r}, expected qforge-scheduler:7700")
        if flag(args, "--allowed-roots") != "/models":
            fail(o, "worker --allowed-roots is not /models")
        threads = flag(c.get("args", []), "--threads")
        limit = c.get("resources", {}).get("limits", {}).get("cpu")
        m = re.fullmatch(r"\$\((\w+)\)", threads or "")
        if m:
            ref = env.get(m.group(1), {}).get("valueFrom", {}).get("resourceFieldRef", {})
            if ref.get("resource") != "limits.cpu" or ref.get("containerName", c["name"]) != c["name"]:
                fail(o, f"--threads {threads} is not this container's limits.cpu (downward API)")
        elif threads is None or limit is None or int(threads) != int(-(-quantity(limit) // 1)):
            fail(o, f"--threads {threads} does not match the CPU limit {limit}")
        if tmpl["spec"].get("terminationGracePeriodSeconds", 30) < 60:
            fail(o, "worker terminationGracePeriodSeconds < 60: too short to finish a task")
        hpa = [d for (k, _), d in objs.items() if k == "HorizontalPodAutoscaler"
               and d["spec"]["scaleTargetRef"].get("name") == "qforge-worker"]
        if len(hpa) != 1:
            fail(o, f"expected one HorizontalPodAutoscaler, got {len(hpa)}")
        else:
            h = hpa[0]
            hs = h["spec"]
            if h["apiVersion"] != "autoscaling/v2":
                fail(o, f"HPA apiVersion {h['apiVersion']}, expected autoscaling/v2")
            ref = hs["scaleTargetRef"]
            if (ref.get("apiVersion"), ref.get("kind"), ref.get("name")) != ("apps/v1", "Deployment", "qforge-worker"):
                fail(o, f"HPA targets {ref}")
            if not 1 <= hs["minReplicas"] <= hs["maxReplicas"]:
                fail(o, f"HPA bounds {hs['minReplicas']}..{hs['maxReplicas']}")
            if s.get("replicas") != hs["minReplicas"]:
                fail(o, f"worker replicas {s.get('replicas')} != HPA minReplicas {hs['minReplicas']}")
            if not any(mt.get("type") == "Resource" and mt["resource"]["name"] == "cpu" for mt in hs["metrics"]):
                fail(o, "HPA does not scale on CPU")
            if not c.get("resources", {}).get("requests", {}).get("cpu"):
                fail(o, "HPA on CPU needs a worker CPU request")
        pdb = [d for (k, _), d in objs.items() if k == "PodDisruptionBudget"
               and selects(d["spec"]["selector"].get("matchLabels"), tl)]
        if len(pdb) != 1:
            fail(o, f"expected one PodDisruptionBudget for the workers, got {len(pdb)}")
        elif pdb[0]["spec"].get("maxUnavailable") in (0, "0", "0%"):
            fail(o, "worker PDB allows no disruption")

    images = {c["image"] for (k, _), d in objs.items() if k in ("StatefulSet", "Deployment")
              for c in d["spec"]["template"]["spec"]["containers"]}
    if len(images) != 1:
        fail(o, f"scheduler and workers run different images: {sorted(images)}")
    # A claim pinned to a volume in this overlay must find it, with the access mode it asks for.
    for (k, n), d in objs.items():
        if k == "PersistentVolumeClaim" and d["spec"].get("volumeName"):
            pv = objs.get(("PersistentVolume", d["spec"]["volumeName"]))
            if pv and not set(d["spec"]["accessModes"]) <= set(pv["spec"]["accessModes"]):
                fail(o, f"claim {n} asks for {d['spec']['accessModes']}, volume offers {pv['spec']['accessModes']}")
            if pv and pv["spec"].get("storageClassName", "") != d["spec"].get("storageClassName"):
                fail(o, f"claim {n} and volume {pv['metadata']['name']} have different storage classes")
    return objs


def api_models():
    """kubernetes.client.models of python3-kubernetes, or None. Imported without the package's __init__ (which
    pulls in auth and HTTP libraries): only the generated API models are needed."""
    import importlib.util
    import os
    import types
    spec = importlib.util.find_spec("kubernetes")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = list(spec.submodule_search_locations)[0]
    for name, path in (("kubernetes", root), ("kubernetes.client", os.path.join(root, "client"))):
        m = types.ModuleType(name)
        m.__path__ = [path]
        sys.modules[name] = m
    try:
        from kubernetes.client import models
        return models
    except Exception as e:  # noqa: BLE001 - an unusable install is the same as none
        print(f"check-k8s: python3-kubernetes unusable ({e}); strict field check skipped", file=sys.stderr)
        return None


def strict_fields(o, models, d):
    """Every key is a field of the API model of its kind, with the right scalar type (catches typos that
    kustomize and PyYAML accept). autoscaling/v2 is checked as v2beta2 where the client predates v2."""
    version = d["apiVersion"].rpartition("/")[2]
    cls = getattr(models, version.capitalize() + d["kind"], None)
    if cls is None and d["apiVersion"] == "autoscaling/v2":
        cls = getattr(models, "V2beta2" + d["kind"], None)
    if cls is None:
        print(f"check-k8s: note: no API model for {d['apiVersion']} {d['kind']} in python3-kubernetes")
        return

    def walk(t, val, path):
        m = re.fullmatch(r"list\[(.+)\]", t)
        if m:
            if not isinstance(val, list):
                return fail(o, f"{path}: expected a list")
            for i, x in enumerate(val):
                walk(m.group(1), x, f"{path}[{i}]")
            return
        m = re.fullmatch(r"dict\(str, (.+)\)", t)
        if m:
            if not isinstance(val, dict):
                return fail(o, f"{path}: expected a map")
            for k, x in val.items():
                walk(m.group(1), x, f"{path}.{k}")
            return
        scalar = {"str": str, "int": int, "bool": bool, "float": (int, float)}
        if t in scalar:
            if not isinstance(val, scalar[t]) or (t == "int" and isinstance(val, bool)):
                fail(o, f"{path}: expected {t}, got {val!r}")
            return
        if t in ("object", "datetime"):
            return
        c = getattr(models, t)
        if not isinstance(val, dict):
            return fail(o, f"{path}: expected a {t} object, got {val!r}")
        fields = {v: k for k, v in c.attribute_map.items()}
        for key, x in val.items():
            if key not in fields:
                fail(o, f"{path}.{key}: not a field of {t}")
            else:
                walk(c.openapi_types[fields[key]], x, f"{path}.{key}")

    walk(cls.__name__, d, f"{d['kind']}/{d['metadata']['name']}")


models = api_models()
if models is None:
    print("check-k8s: note: strict field check skipped (needs python3-kubernetes)")
by_overlay = {}
for arg in sys.argv[1:]:
    overlay, path = arg.split("=", 1)
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    objs = check(overlay, docs)
    if models is not None and overlay not in by_overlay:
        for d in objs.values():
            strict_fields(overlay, models, d)
    by_overlay.setdefault(overlay, []).append(objs)
for overlay, renders in by_overlay.items():
    for other in renders[1:]:
        if other != renders[0]:
            diff = sorted(k for k in set(renders[0]) | set(other) if renders[0].get(k) != other.get(k))
            fail(overlay, f"kubectl versions render different objects: {diff}")
    print(f"check-k8s: {overlay}: {len(renders[0])} objects: " +
          ", ".join(f"{k}/{n}" for k, n in sorted(renders[0])))
if failures:
    for f in failures:
        print(f"check-k8s: FAIL: {f}", file=sys.stderr)
    sys.exit(1)
print("check-k8s: OK")
PY
