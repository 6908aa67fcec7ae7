#!/usr/bin/env python3
"""Assertions on manifests rendered from charts/kandinsky (run by tools/chart-check.sh).

    chart_assertions.py --profile gpu|cpu|monitoring|variants --fullname NAME manifest.yaml

Each assertion prints one PASS/FAIL line; the exit status is 1 when any failed. The contract
the chart must honour is services/README.md (binaries, flags, ports, gRPC health service names): it is
restated in STAGES / FLAGS below so that a chart change that drifts from it fails here.
Needs PyYAML (a dependency of kubernetes-validate, so the chart-check venv has it).
"""

import argparse
import base64
import json
import posixpath
import re
import sys

import yaml

# values key -> facts from services/README.md and DESIGN.md.
STAGES = {
    "gateway": dict(component="gateway", binary="kd-gateway", health="kandinsky.v1.Gateway",
                    model=None, redis=True, gpu_default=False),
    "textEncoder": dict(component="text-encoder", binary="kd-text-encoder",
                        health="kandinsky.v1.TextEncoder", model="prior", redis=True,
                        gpu_default=False),
    "prior": dict(component="prior", binary="kd-prior", health="kandinsky.v1.Prior",
                  model="prior", redis=True, gpu_default=True),
    "denoiser": dict(component="denoiser", binary="kd-denoiser", health="kandinsky.v1.Denoiser",
                     model="decoder", redis=False, gpu_default=True),
    "movq": dict(component="movq", binary="kd-movq", health="kandinsky.v1.Movq",
                 model="decoder", redis=False, gpu_default=True),
}

COMMON_FLAGS = {"--listen", "--metrics-listen", "--otlp-endpoint", "--log-format", "--max-queue",
                "--tls-cert", "--tls-key", "--tls-client-ca"}
FLAGS = {
    "kd-gateway": COMMON_FLAGS | {"--text-encoder-url", "--prior-url", "--denoiser-url",
                                  "--movq-url", "--api-keys-file", "--redis-url", "--extra-stack",
                                  "--stage-tls-ca", "--stage-tls-cert", "--stage-tls-key"},
    **{b: COMMON_FLAGS | {"--model-dir", "--device", "--dtype", "--redis-url"}
       for b in ("kd-text-encoder", "kd-prior", "kd-denoiser", "kd-movq")},
}
FLAGS["kd-text-encoder"] = FLAGS["kd-text-encoder"] | {"--decoder-model-dir"}
URL_FLAGS = {"textEncoder": "--text-encoder-url", "prior": "--prior-url",
             "denoiser": "--denoiser-url", "movq": "--movq-url"}
STANDARD_LABELS = ["app.kubernetes.io/name", "app.kubernetes.io/instance",
                   "app.kubernetes.io/managed-by", "app.kubernetes.io/version",
                   "app.kubernetes.io/part-of", "helm.sh/chart"]
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TAINT_KEY = "nvidia.com/gpu"
MODEL_DIRS = {"prior": "/models/kandinsky-2-2-prior", "decoder": "/models/kandinsky-2-2-decoder"}
# Startup budget (failureThreshold x periodSeconds) for loading weights + warm-up.
MIN_STARTUP_S = {"gateway": 60, "textEncoder": 600, "prior": 600, "denoiser": 600, "movq": 600}

# What each render is expected to look like.
PROFILES = {
    # charts/kandinsky/values.yaml as shipped.
    "gpu": dict(gpu_stages={"prior", "denoiser", "movq"},
                gpu_selector={"nvidia.com/gpu.present": "true"},
                redis="chart", auth_secret="created", models="pvc", hpa_off=set(),
                service_monitor=False, network_policy=False, gateway_service_type="ClusterIP",
                tls=False),
    # ci/cpu-values.yaml: nobody gets a GPU.
    "cpu": dict(gpu_stages=set(), gpu_selector={}, redis="chart", auth_secret="created",
                models="pvc", hpa_off=set(), service_monitor=False, network_policy=False,
                gateway_service_type="ClusterIP", tls=False),
    # defaults + ServiceMonitor (chart-check also drops a test dashboard into dashboards/).
    "monitoring": dict(gpu_stages={"prior", "denoiser", "movq"},
                       gpu_selector={"nvidia.com/gpu.present": "true"}, redis="chart",
                       auth_secret="created", models="pvc", hpa_off=set(),
                       service_monitor=True, network_policy=False,
                       gateway_service_type="ClusterIP", tls=False),
    # ci/variants-values.yaml: external Redis from a Secret, existing API-key Secret, hostPath
    # models, gateway without HPA behind a LoadBalancer, a different GPU node label,
    # NetworkPolicies.
    "variants": dict(gpu_stages={"prior", "denoiser", "movq"},
                     gpu_selector={"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
                     redis="external-secret", auth_secret="existing", models="hostPath",
                     hpa_off={"gateway"}, service_monitor=False, network_policy=True,
                     gateway_service_type="LoadBalancer", tls=False),
    # ci/tls-values.yaml: defaults + mutual TLS between gateway and stages from a cert-manager
    # Certificate, TLS on the gateway's public port.
    "tls": dict(gpu_stages={"prior", "denoiser", "movq"},
                gpu_selector={"nvidia.com/gpu.present": "true"},
                redis="chart", auth_secret="created", models="pvc", hpa_off=set(),
                service_monitor=False, network_policy=False, gateway_service_type="ClusterIP",
                tls=True),
}
TLS_DIR = "/etc/kandinsky/tls"


class Checker:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, name, ok, detail=""):
        if ok:
            self.passed += 1
            print(f"  PASS {name}")
        else:
            self.failed += 1
            print(f"  FAIL {name}" + (f": {detail}" if detail else ""))
        return ok


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def parse_args(args):
    """--flag=value / --flag value / --flag -> {flag: value or None}; also returns the order."""
    out, order, i = {}, [], 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            if "=" in a:
                k, v = a.split("=", 1)
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                k, v = a, args[i + 1]
                i += 1
            else:
                k, v = a, None
            out[k] = v
            order.append(k)
        i += 1
    return out, order


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def subset(small, big):
    return all(big.get(k) == v for k, v in (small or {}).items())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", required=True, choices=sorted(PROFILES))
    ap.add_argument("--fullname", required=True, help="the chart's full name prefix")
    ap.add_argument("--dashboard", action="append", default=[],
                    help="a file expected in the dashboard ConfigMap (repeat); none: no ConfigMap")
    ap.add_argument("manifest")
    opts = ap.parse_args()
    prof = PROFILES[opts.profile]
    docs = load(opts.manifest)
    c = Checker()
    print(f"chart assertions [{opts.profile}] on {opts.manifest} ({len(docs)} objects)")

    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)

    def named(kind, name):
        return next((d for d in by_kind.get(kind, []) if d["metadata"]["name"] == name), None)

    # --- every object: standard labels ---------------------------------------------------
    missing = [f'{d["kind"]}/{d["metadata"]["name"]}: {[l for l in STANDARD_LABELS if l not in d["metadata"].get("labels", {})]}'
               for d in docs
               if any(l not in d["metadata"].get("labels", {}) for l in STANDARD_LABELS)]
    c.check("every object carries the standard app.kubernetes.io/* and helm.sh/chart labels",
            not missing, "; ".join(missing))

    bad_names = [f'{d["kind"]}/{d["metadata"]["name"]}' for d in docs
                 if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", d["metadata"]["name"])]
    c.check("every object name is a DNS-1035 label of at most 63 characters", not bad_names, str(bad_names))

    services = by_kind.get("Service", [])
    redis_svc = named("Service", f"{opts.fullname}-redis")

    deployments = {}
    for key, st in STAGES.items():
        name = f"{opts.fullname}-{st['component']}"
        dep = named("Deployment", name)
        if not c.check(f"{key}: Deployment {name} exists", dep is not None):
            continue
        deployments[key] = dep
        pod = dep["spec"]["template"]
        spec = pod["spec"]
        pod_labels = pod["metadata"].get("labels", {})
        c.check(f"{key}: selector matches its pod labels and names the component",
                subset(dep["spec"]["selector"]["matchLabels"], pod_labels)
                and dep["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/component") == st["component"])
        ctrs = spec["containers"]
        ctr = next((x for x in ctrs if x["name"] == st["component"]), None)
        if not c.check(f"{key}: container {st['component']} exists", ctr is not None):
            continue
        c.check(f"{key}: runs {st['binary']}", ctr.get("command") == [st["binary"]], str(ctr.get("command")))
        flags, order = parse_args(ctr.get("args", []))
        unknown = sorted(set(order) - FLAGS[st["binary"]])
        c.check(f"{key}: passes only flags {st['binary']} accepts (services/README.md)", not unknown, str(unknown))
        dup = sorted({f for f in order if order.count(f) > 1})
        c.check(f"{key}: passes no flag twice", not dup, str(dup))
        ports = {p["name"]: p["containerPort"] for p in ctr.get("ports", [])}
        c.check(f"{key}: container ports named grpc and metrics", {"grpc", "metrics"} <= set(ports), str(ports))
        c.check(f"{key}: --listen / --metrics-listen match the grpc / metrics ports",
                "--listen" in flags and "--metrics-listen" in flags
                and port_of(flags["--listen"]) == ports.get("grpc")
                and port_of(flags["--metrics-listen"]) == ports.get("metrics"),
                f'{flags.get("--listen")} {flags.get("--metrics-listen")} {ports}')

        # Probes: native gRPC against grpc.health.v1 with the stage's service name; a gRPC port
        # that speaks TLS (which Kubernetes' gRPC probes cannot) is probed on /healthz instead.
        tls_port = prof["tls"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            p = ctr.get(probe) or {}
            if tls_port:
                h = p.get("httpGet") or {}
                c.check(f"{key}: {probe} is GET /healthz on the metrics port (TLS gRPC port)",
                        h.get("path") == "/healthz" and h.get("port") in ("metrics", ports.get("metrics"))
                        and "grpc" not in p, str(p))
                continue
            g = p.get("grpc") or {}
            c.check(f"{key}: {probe} is gRPC health on the grpc port for service {st['health']}",
                    g.get("service") == st["health"] and g.get("port") == ports.get("grpc"), str(p))

        # TLS: the certificate Secret on a read-only mount (no subPath: renewals reach the pod).
        tls_flags = {f: v for f, v in flags.items() if "tls" in f}
        if prof["tls"]:
            want = {"--tls-cert": f"{TLS_DIR}/tls.crt", "--tls-key": f"{TLS_DIR}/tls.key"}
            if key == "gateway":
                want.update({"--stage-tls-ca": f"{TLS_DIR}/ca.crt",
                             "--stage-tls-cert": f"{TLS_DIR}/tls.crt",
                             "--stage-tls-key": f"{TLS_DIR}/tls.key"})
            else:
                want["--tls-client-ca"] = f"{TLS_DIR}/ca.crt"
            c.check(f"{key}: TLS flags point into the certificate mount", tls_flags == want,
                    f"{tls_flags} != {want}")
            tm = [m for m in ctr.get("volumeMounts", []) if m["mountPath"].rstrip("/") == TLS_DIR]
            tv = {v["name"]: v for v in spec.get("volumes", [])}
            sec = (tv.get(tm[0]["name"], {}) if tm else {}).get("secret") or {}
            c.check(f"{key}: the certificate is a read-only Secret mount of {opts.fullname}-tls",
                    len(tm) == 1 and tm[0].get("readOnly") is True and "subPath" not in tm[0]
                    and sec.get("secretName") == f"{opts.fullname}-tls"
                    and {i.get("key") for i in sec.get("items", [])} == {"tls.crt", "tls.key", "ca.crt"},
                    f"{tm} {sec}")
        else:
            c.check(f"{key}: no TLS flags without tls.enabled", not tls_flags, str(tls_flags))
        sp = ctr.get("startupProbe") or {}
        budget = sp.get("failureThreshold", 3) * sp.get("periodSeconds", 10)
        c.check(f"{key}: startup probe allows >= {MIN_STARTUP_S[key]} s for loading ({budget} s)",
                budget >= MIN_STARTUP_S[key])

        # GPU placement.
        res = ctr.get("resources", {})
        gpu_req = {k: v for part in ("limits", "requests") for k, v in (res.get(part) or {}).items()
                   if k == GPU_RESOURCE}
        ns = spec.get("nodeSelector") or {}
        tol = spec.get("tolerations") or []
        gpu_tol = [t for t in tol if t.get("key") == GPU_TAINT_KEY]
        image = ctr.get("image", "")
        if key in prof["gpu_stages"]:
            c.check(f"{key}: limits {GPU_RESOURCE} >= 1",
                    int((res.get("limits") or {}).get(GPU_RESOURCE, 0)) >= 1, str(res))
            c.check(f"{key}: GPU node selector {prof['gpu_selector']}",
                    subset(prof["gpu_selector"], ns) and prof["gpu_selector"], str(ns))
            c.check(f"{key}: tolerates the {GPU_TAINT_KEY} NoSchedule taint",
                    any(t.get("effect") == "NoSchedule" and t.get("operator") in ("Exists", "Equal")
                        for t in gpu_tol), str(tol))
            c.check(f"{key}: --device=cuda:N", re.fullmatch(r"cuda:\d+", flags.get("--device") or "") is not None,
                    str(flags.get("--device")))
            c.check(f"{key}: runs the CUDA image", image.endswith("-cuda"), image)
        else:
            c.check(f"{key}: no {GPU_RESOURCE} requests or limits", not gpu_req, str(res))
            c.check(f"{key}: no GPU node selector",
                    not any("gpu" in k or "accelerator" in k for k in ns), str(ns))
            c.check(f"{key}: no GPU toleration", not gpu_tol, str(tol))
            c.check(f"{key}: runs the CPU image", not image.endswith("-cuda"), image)
            if st["model"]:
                c.check(f"{key}: --device=cpu", flags.get("--device") == "cpu", str(flags.get("--device")))
            else:
                c.check(f"{key}: no --device flag (the gateway holds no model)", "--device" not in flags)
        if st["model"]:
            c.check(f"{key}: --dtype given", flags.get("--dtype") in ("f32", "f16", "bf16"), str(flags.get("--dtype")))
            if key not in prof["gpu_stages"]:
                c.check(f"{key}: f32 on CPU", flags.get("--dtype") == "f32", str(flags.get("--dtype")))

        # Model volume: read-only, the right folder.
        mounts = ctr.get("volumeMounts", [])
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        if st["model"]:
            md = flags.get("--model-dir") or ""
            c.check(f"{key}: --model-dir is the {st['model']} folder", md == MODEL_DIRS[st["model"]], md)
            m = [x for x in mounts if md == x["mountPath"] or md.startswith(x["mountPath"].rstrip("/") + "/")]
            c.check(f"{key}: --model-dir lies on a read-only volume mount",
                    m and all(x.get("readOnly") is True for x in m), str(m))
            if m:
                v = vols.get(m[0]["name"], {})
                if prof["models"] == "pvc":
                    pvc = v.get("persistentVolumeClaim") or {}
                    c.check(f"{key}: model volume is the models PVC, read-only",
                            pvc.get("readOnly") is True and bool(pvc.get("claimName")), str(v))
                    c.check(f"{key}: the models PVC is rendered",
                            named("PersistentVolumeClaim", pvc.get("claimName")) is not None, pvc.get("claimName"))
                elif prof["models"] == "hostPath":
                    c.check(f"{key}: model volume is a hostPath", "hostPath" in v, str(v))
            if key == "textEncoder":
                dd = flags.get("--decoder-model-dir") or ""
                c.check(f"{key}: --decoder-model-dir is the decoder folder (2.1's XLM-R)",
                        dd == MODEL_DIRS["decoder"], dd)
                c.check(f"{key}: --decoder-model-dir lies on a read-only volume mount",
                        any(dd.startswith(x["mountPath"].rstrip("/") + "/") and x.get("readOnly") is True
                            for x in mounts), dd)
        else:
            c.check(f"{key}: no model volume (holds no model)", "--model-dir" not in flags)
        rw = [x["mountPath"] for x in mounts if x["name"] != "tmp" and x.get("readOnly") is not True]
        c.check(f"{key}: every mount but /tmp is read-only", not rw, str(rw))

        # Security.
        psc = spec.get("securityContext") or {}
        csc = ctr.get("securityContext") or {}
        c.check(f"{key}: runs as non-root with a read-only root filesystem",
                (psc.get("runAsNonRoot") or csc.get("runAsNonRoot")) is True
                and csc.get("readOnlyRootFilesystem") is True
                and csc.get("allowPrivilegeEscalation") is False
                and "ALL" in ((csc.get("capabilities") or {}).get("drop") or []), f"{psc} {csc}")
        c.check(f"{key}: no service account token mounted", spec.get("automountServiceAccountToken") is False)
        grace = spec.get("terminationGracePeriodSeconds", 30)
        pre = (((ctr.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command", [])
        pre_s = int(pre[-1]) if pre and pre[0] == "sleep" else 0
        c.check(f"{key}: terminationGracePeriodSeconds ({grace}) >= 60 and covers the preStop sleep ({pre_s})",
                grace >= 60 and grace > pre_s + 30)

        # Metrics.
        ann = pod["metadata"].get("annotations", {})
        c.check(f"{key}: prometheus.io scrape annotations name the metrics port",
                ann.get("prometheus.io/scrape") == "true"
                and ann.get("prometheus.io/port") == str(ports.get("metrics")), str(ann))

        # Redis.
        env = {e["name"]: e for e in ctr.get("env", [])}
        if st["redis"] and prof["redis"] == "chart":
            url = (env.get("KD_REDIS_URL") or {}).get("value", "")
            want = f"redis://{redis_svc['metadata']['name']}:{redis_svc['spec']['ports'][0]['port']}/" if redis_svc else None
            c.check(f"{key}: KD_REDIS_URL points at the chart's Redis Service",
                    want is not None and url.startswith(want), f"{url} vs {want}")
        elif st["redis"] and prof["redis"] == "external-secret":
            ref = ((env.get("KD_REDIS_URL") or {}).get("valueFrom") or {}).get("secretKeyRef")
            c.check(f"{key}: KD_REDIS_URL comes from a Secret", bool(ref), str(env.get("KD_REDIS_URL")))
        else:
            c.check(f"{key}: no Redis URL (the binary takes none)", "KD_REDIS_URL" not in env and "--redis-url" not in flags)

        # HPA and PDB.
        hpas = [h for h in by_kind.get("HorizontalPodAutoscaler", [])
                if h["spec"]["scaleTargetRef"].get("kind") == "Deployment"
                and h["spec"]["scaleTargetRef"].get("name") == name]
        if key in prof["hpa_off"]:
            c.check(f"{key}: no HPA and a fixed replica count", not hpas and dep["spec"].get("replicas", 0) >= 1)
        else:
            ok = (len(hpas) == 1 and hpas[0]["apiVersion"] == "autoscaling/v2"
                  and hpas[0]["spec"]["scaleTargetRef"].get("apiVersion") == "apps/v1"
                  and 1 <= hpas[0]["spec"].get("minReplicas", 1) <= hpas[0]["spec"]["maxReplicas"]
                  and bool(hpas[0]["spec"].get("metrics")))
            c.check(f"{key}: one autoscaling/v2 HPA targets the Deployment (1 <= min <= max, metrics set)", ok,
                    str([h["spec"] for h in hpas]))
            c.check(f"{key}: Deployment leaves replicas to the HPA", "replicas" not in dep["spec"])
            if hpas and any(m.get("type") == "Resource" and m["resource"]["name"] == "cpu"
                            for m in hpas[0]["spec"].get("metrics", [])):
                c.check(f"{key}: CPU-utilisation HPA has a CPU request to measure against",
                        "cpu" in (res.get("requests") or {}), str(res))
        pdbs = [p for p in by_kind.get("PodDisruptionBudget", [])
                if p["apiVersion"] == "policy/v1"
                and subset(p["spec"]["selector"].get("matchLabels"), pod_labels)
                and p["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/component") == st["component"]]
        c.check(f"{key}: one policy/v1 PDB selects exactly this stage's pods",
                len(pdbs) == 1 and (("minAvailable" in pdbs[0]["spec"]) != ("maxUnavailable" in pdbs[0]["spec"])),
                str([p["spec"] for p in pdbs]))

        # Services.
        svcs = [s for s in services if s["spec"].get("selector")
                and subset(s["spec"]["selector"], pod_labels)
                and s["spec"]["selector"].get("app.kubernetes.io/component") == st["component"]]
        grpc_svcs = [s for s in svcs if any(p["name"] == "grpc" for p in s["spec"]["ports"])]
        metric_svcs = [s for s in svcs if any(p["name"] == "metrics" for p in s["spec"]["ports"])]
        if key == "gateway":
            ok = (len(grpc_svcs) == 1 and grpc_svcs[0]["metadata"]["name"] == name
                  and grpc_svcs[0]["spec"].get("clusterIP") != "None"
                  and grpc_svcs[0]["spec"].get("type", "ClusterIP") == prof["gateway_service_type"])
            c.check(f"gateway: Service {name} is a normal {prof['gateway_service_type']} Service on grpc", ok,
                    str([s["spec"] for s in grpc_svcs]))
            c.check("gateway: its metrics port is not on the client-facing Service",
                    not any(p["name"] == "metrics" for s in grpc_svcs for p in s["spec"]["ports"]))
        else:
            ok = (len(grpc_svcs) == 1 and grpc_svcs[0]["metadata"]["name"] == name
                  and grpc_svcs[0]["spec"].get("clusterIP") == "None"
                  and not grpc_svcs[0]["spec"].get("publishNotReadyAddresses", False))
            c.check(f"{key}: Service {name} is headless (clusterIP: None), ready pods only", ok,
                    str([s["spec"] for s in grpc_svcs]))
        for s in grpc_svcs:
            gp = next(p for p in s["spec"]["ports"] if p["name"] == "grpc")
            c.check(f"{key}: Service {s['metadata']['name']} grpc port targets the container's grpc port",
                    gp.get("targetPort") in ("grpc", ports.get("grpc")), str(gp))
        c.check(f"{key}: a Service exposes the metrics port (for the ServiceMonitor)", len(metric_svcs) == 1,
                str([s["metadata"]["name"] for s in metric_svcs]))

    # --- network policies ------------------------------------------------------------------------
    nps = by_kind.get("NetworkPolicy", [])
    if prof["network_policy"] and "gateway" in deployments:
        gw_labels = deployments["gateway"]["spec"]["template"]["metadata"]["labels"]
        for key, dep in deployments.items():
            labels = dep["spec"]["template"]["metadata"]["labels"]
            mine = [n for n in nps if subset(n["spec"]["podSelector"].get("matchLabels"), labels)]
            grpc_rules = [r for n in mine for r in n["spec"].get("ingress", [])
                          if any(p.get("port") in ("grpc", 50051) for p in r.get("ports", []))]
            if key == "gateway":
                c.check("gateway: a NetworkPolicy admits its gRPC port", len(grpc_rules) >= 1)
            else:
                ok = bool(grpc_rules) and all(
                    r.get("from") and all(subset((p.get("podSelector") or {}).get("matchLabels"), gw_labels)
                                          and (p.get("podSelector") or {}).get("matchLabels", {}).get(
                                              "app.kubernetes.io/component") == "gateway"
                                          and "namespaceSelector" not in p and "ipBlock" not in p
                                          for p in r["from"])
                    for r in grpc_rules)
                c.check(f"{key}: NetworkPolicy admits gRPC from the gateway only", ok, str(grpc_rules))
    else:
        c.check("no NetworkPolicy unless enabled", not nps)

    # --- gateway wiring --------------------------------------------------------------------
    gw = deployments.get("gateway")
    if gw:
        gctr = gw["spec"]["template"]["spec"]["containers"][0]
        gflags, _ = parse_args(gctr.get("args", []))
        for key, flag in URL_FLAGS.items():
            svc = named("Service", f"{opts.fullname}-{STAGES[key]['component']}")
            want = None
            if svc:
                port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
                want = f"http://{svc['metadata']['name']}:{port}"
            c.check(f"gateway: {flag} points at the headless {STAGES[key]['component']} Service ({want})",
                    want is not None and gflags.get(flag) == want and svc["spec"].get("clusterIP") == "None",
                    str(gflags.get(flag)))
        # API keys file mounted from a Secret, read-only.
        path = gflags.get("--api-keys-file")
        if c.check("gateway: --api-keys-file is set", bool(path)):
            mdir, fname = posixpath.split(path)
            mounts = [m for m in gctr.get("volumeMounts", []) if m["mountPath"].rstrip("/") == mdir]
            vols = {v["name"]: v for v in gw["spec"]["template"]["spec"].get("volumes", [])}
            sec = (vols.get(mounts[0]["name"], {}) if mounts else {}).get("secret") or {}
            c.check("gateway: the API keys file is a read-only Secret mount",
                    len(mounts) == 1 and mounts[0].get("readOnly") is True and "subPath" not in mounts[0]
                    and any(i.get("path") == fname for i in sec.get("items", [])), f"{mounts} {sec}")
            secret = named("Secret", sec.get("secretName"))
            if prof["auth_secret"] == "created":
                key_name = next((i["key"] for i in sec.get("items", []) if i.get("path") == fname), None)
                content = base64.b64decode((secret or {}).get("data", {}).get(key_name, "")).decode()
                c.check("gateway: the chart's API-key Secret holds at least one key",
                        secret is not None and any(l.strip() for l in content.splitlines()))
            else:
                c.check("gateway: an existing API-key Secret is used, not created",
                        secret is None and bool(sec.get("secretName")), str(sec))

    # --- TLS certificate (cert-manager) ---------------------------------------------------------
    certs = by_kind.get("Certificate", [])
    if prof["tls"]:
        cert = named("Certificate", f"{opts.fullname}-tls")
        if c.check("tls: a cert-manager Certificate writes the Secret the pods mount",
                   cert is not None and cert["spec"].get("secretName") == f"{opts.fullname}-tls"):
            names = set(cert["spec"].get("dnsNames", []))
            missing = [f"{opts.fullname}-{st['component']}" for st in STAGES.values()
                       if f"{opts.fullname}-{st['component']}" not in names]
            c.check("tls: the certificate names every stage Service (the host of each stage URL)",
                    not missing, str(missing))
            c.check("tls: the certificate serves as server and client certificate",
                    {"server auth", "client auth"} <= set(cert["spec"].get("usages", [])),
                    str(cert["spec"].get("usages")))
    else:
        c.check("tls: no Certificate without tls.enabled", not certs, str(len(certs)))

    # --- Redis ---------------------------------------------------------------------------------
    sts = by_kind.get("StatefulSet", [])
    if prof["redis"] == "chart":
        ok = redis_svc is not None and len(sts) == 1 and subset(
            redis_svc["spec"]["selector"], sts[0]["spec"]["template"]["metadata"]["labels"])
        c.check("redis: a StatefulSet and a Service selecting it", ok)
        if sts:
            rctr = sts[0]["spec"]["template"]["spec"]["containers"][0]
            c.check("redis: non-root, read-only root filesystem, no persistence",
                    sts[0]["spec"]["template"]["spec"]["securityContext"].get("runAsNonRoot") is True
                    and rctr["securityContext"].get("readOnlyRootFilesystem") is True
                    and "--appendonly" in rctr["args"] and "--save" in rctr["args"])
    else:
        c.check("redis: none deployed by the chart", redis_svc is None and not sts)

    # --- monitoring --------------------------------------------------------------------------
    sms = by_kind.get("ServiceMonitor", [])
    if prof["service_monitor"]:
        ok = len(sms) == 1 and sms[0]["apiVersion"] == "monitoring.coreos.com/v1"
        c.check("monitoring: one monitoring.coreos.com/v1 ServiceMonitor", ok)
        if sms:
            sm = sms[0]["spec"]
            c.check("monitoring: it scrapes the port named metrics",
                    [e.get("port") for e in sm.get("endpoints", [])] == ["metrics"], str(sm.get("endpoints")))
            sel = sm["selector"].get("matchLabels", {})
            comps = set()
            for e in sm["selector"].get("matchExpressions", []):
                if e["key"] == "app.kubernetes.io/component" and e["operator"] == "In":
                    comps = set(e["values"])
            scraped = {s["metadata"]["labels"].get("app.kubernetes.io/component") for s in services
                       if subset(sel, s["metadata"]["labels"])
                       and (not comps or s["metadata"]["labels"].get("app.kubernetes.io/component") in comps)
                       and any(p["name"] == "metrics" for p in s["spec"]["ports"])}
            want = {st["component"] for st in STAGES.values()}
            c.check("monitoring: it selects a metrics Service of every stage", want <= scraped,
                    f"missing {sorted(want - scraped)}")
    else:
        c.check("monitoring: no ServiceMonitor unless enabled", not sms)
    cms = [m for m in by_kind.get("ConfigMap", []) if m["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    if opts.dashboard:
        c.check("dashboards: one ConfigMap labelled grafana_dashboard: \"1\"", len(cms) == 1)
        if cms:
            data = cms[0].get("data", {})
            c.check(f"dashboards: it holds every dashboards/ file {sorted(opts.dashboard)}",
                    sorted(data) == sorted(opts.dashboard), str(sorted(data)))
            bad = []
            for k, v in data.items():
                try:
                    json.loads(v)
                except ValueError as e:
                    bad.append(f"{k}: {e}")
            c.check("dashboards: every dashboard is valid JSON", not bad, "; ".join(bad))
    else:
        c.check("dashboards: no dashboard ConfigMap when dashboards/ has no JSON file", not cms)

    print(f"chart assertions [{opts.profile}]: {c.passed} passed, {c.failed} failed")
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
