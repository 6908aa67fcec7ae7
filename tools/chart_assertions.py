#!/usr/bin/env python3
"""Assertions on manifests rendered from charts/kandinsky (run by tools/chart-check.sh).

    chart_assertions.py --profile PROFILE --fullname NAME [--dashboard FILE]... manifest.yaml

PROFILE is one of PROFILES below (gpu, cpu, monitoring, variants, tls, two-models, three-models,
amused, amused-single).

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
# Flags a binary takes more than once (clap Vec flags): the gateway's extra stage sets.
REPEATABLE_FLAGS = {"--extra-stack"}
MODEL_KEYS = ["textEncoder", "prior", "denoiser", "movq"]
# The label naming a model stage set (models.sets[].name); selectors carry it in sets mode only.
SET_LABEL = "kandinsky-serve/model-set"
SELECTOR_KEYS = {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"}
# The dashboard the chart ships (others, e.g. chart-check's test dashboard, are not inspected).
CHART_DASHBOARD = "kandinsky-serve.json"
STANDARD_LABELS = ["app.kubernetes.io/name", "app.kubernetes.io/instance",
                   "app.kubernetes.io/managed-by", "app.kubernetes.io/version",
                   "app.kubernetes.io/part-of", "helm.sh/chart"]
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TAINT_KEY = "nvidia.com/gpu"
MODELS_MOUNT = "/models"
# The single-model shape's folders (models.priorDir / models.decoderDir defaults).
SINGLE_SET = dict(name=None, prior="kandinsky-2-2-prior", decoder="kandinsky-2-2-decoder")
# A set's prior folder None: a prior-less set (aMUSEd: one folder, in `decoder`). It has no prior
# objects; its text-encoder reads the decoder folder without --decoder-model-dir; the gateway
# passes --prior-url none (default set) or an --extra-stack without prior=.
# Startup budget (failureThreshold x periodSeconds) for loading weights + warm-up.
MIN_STARTUP_S = {"gateway": 60, "textEncoder": 600, "prior": 600, "denoiser": 600, "movq": 600}

# What each render is expected to look like. Keys every profile may set (defaults in
# PROFILE_DEFAULTS): tls_gateway (the gateway's public port speaks TLS too), single (the folders
# of the single-model shape, SINGLE_SET by default) and sets (None: the single-model shape; else the model sets in values order, each name, prior/decoder folders,
# claim (claim name, rendered by the chart?) and expect: {stage key: per-set overrides that must
# show in the render, see check_expect}).
GPU_STAGES = {"prior", "denoiser", "movq"}
GPU_PRESENT = {"nvidia.com/gpu.present": "true"}
PROFILE_DEFAULTS = dict(tls_gateway=False, sets=None, single=SINGLE_SET)
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
                tls=True, tls_gateway=True),
    # ci/two-models-values.yaml: Kandinsky 2.2 (default, shared created claim) + 2.1 (existing
    # claim of its own, a bigger denoiser); NetworkPolicies on.
    "two-models": dict(
        gpu_stages=GPU_STAGES, gpu_selector=GPU_PRESENT, redis="chart", auth_secret="created",
        models="pvc", hpa_off=set(), service_monitor=False, network_policy=True,
        gateway_service_type="ClusterIP", tls=False,
        sets=[
            dict(name="kandinsky-2-2", prior="kandinsky-2-2-prior", decoder="kandinsky-2-2-decoder",
                 claim=("{fullname}-models", True),
                 # Not overridden: the top-level denoiser's values.
                 expect={"denoiser": dict(requests={"cpu": "2", "memory": "8Gi"},
                                          limits={"memory": "16Gi", GPU_RESOURCE: 1},
                                          hpa=dict(min=1, max=8, cpu=70))}),
            dict(name="kandinsky-2-1", prior="kandinsky-2-1-prior", decoder="kandinsky-2-1",
                 claim=("kandinsky-2-1-weights", False),
                 # Overridden memory and maxReplicas; cpu, minReplicas and the CPU target merged in.
                 expect={"denoiser": dict(requests={"cpu": "2", "memory": "10Gi"},
                                          limits={"memory": "20Gi", GPU_RESOURCE: 1},
                                          hpa=dict(min=1, max=4, cpu=70))}),
        ]),
    # ci/three-models-values.yaml: 2.2 (default) + 2.1 (a claim of its own, created) + the
    # distilled 2.2 decoder, per-stage overrides; mutual TLS (cert-manager) and the ServiceMonitor.
    "three-models": dict(
        gpu_stages=GPU_STAGES, gpu_selector=GPU_PRESENT, redis="chart", auth_secret="created",
        models="pvc", hpa_off=set(), service_monitor=True, network_policy=False,
        gateway_service_type="ClusterIP", tls=True,
        sets=[
            dict(name="kandinsky-2-2", prior="kandinsky-2-2-prior", decoder="kandinsky-2-2-decoder",
                 claim=("{fullname}-models", True),
                 expect={"textEncoder": dict(requests={"cpu": "4", "memory": "6Gi"},
                                             limits={"memory": "8Gi"}),
                         "prior": dict(args={"--max-queue": "64"}),
                         "denoiser": dict(hpa=dict(min=1, max=8, cpu=70), pdb={"maxUnavailable": 1}),
                         "movq": dict(limits={"memory": "8Gi", GPU_RESOURCE: 1},
                                      hpa=dict(min=1, max=4, cpu=70))}),
            dict(name="kandinsky-2-1", prior="kandinsky-2-1-prior", decoder="kandinsky-2-1",
                 claim=("{fullname}-models-kandinsky-2-1", True),
                 claim_spec={"storageClassName": "fast-rwx", "storage": "40Gi"},
                 expect={"textEncoder": dict(requests={"cpu": "4", "memory": "8Gi"},
                                             limits={"memory": "12Gi"}),
                         "prior": dict(args={"--max-queue": "32"})}),
            dict(name="kandinsky-2-2-distilled", prior="kandinsky-2-2-prior",
                 decoder="kandinsky-2-2-decoder-distilled", claim=("{fullname}-models", True),
                 expect={"denoiser": dict(replicas=2, hpa=False, pdb={"minAvailable": 1},
                                          node_selector={**GPU_PRESENT,
                                                         "cloud.google.com/gke-accelerator": "nvidia-l4"}),
                         "movq": dict(limits={"memory": "8Gi", GPU_RESOURCE: 2},
                                      hpa=dict(min=1, max=2, cpu=70), pod_labels={"tier": "fast"})}),
        ]),
    # ci/amused-values.yaml: Kandinsky 2.2 (default) + amused-256 and kandinsky-2-0, prior-less
    # sets (one folder: text-encoder, denoiser and movq, no prior), all on the shared created
    # claim, a smaller aMUSEd denoiser; NetworkPolicies on.
    "amused": dict(
        gpu_stages=GPU_STAGES, gpu_selector=GPU_PRESENT, redis="chart", auth_secret="created",
        models="pvc", hpa_off=set(), service_monitor=False, network_policy=True,
        gateway_service_type="ClusterIP", tls=False,
        sets=[
            dict(name="kandinsky-2-2", prior="kandinsky-2-2-prior", decoder="kandinsky-2-2-decoder",
                 claim=("{fullname}-models", True)),
            dict(name="amused-256", prior=None, decoder="amused-256", claim=("{fullname}-models", True),
                 expect={"denoiser": dict(requests={"cpu": "2", "memory": "4Gi"},
                                          limits={"memory": "8Gi", GPU_RESOURCE: 1},
                                          hpa=dict(min=1, max=4, cpu=70))}),
            dict(name="kandinsky-2-0", prior=None, decoder="kandinsky-2-0",
                 claim=("{fullname}-models", True)),
        ]),
    # ci/amused-single-values.yaml: one aMUSEd model in the one-model shape (models.priorDir "").
    "amused-single": dict(
        gpu_stages=GPU_STAGES, gpu_selector=GPU_PRESENT, redis="chart", auth_secret="created",
        models="pvc", hpa_off=set(), service_monitor=False, network_policy=False,
        gateway_service_type="ClusterIP", tls=False,
        single=dict(name=None, prior=None, decoder="amused-512")),
}
PROFILES = {k: {**PROFILE_DEFAULTS, **v} for k, v in PROFILES.items()}
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


def flag_values(args, flag):
    """Every value of a repeatable --flag=value / --flag value, in order."""
    out = []
    for i, a in enumerate(args):
        if a.startswith(flag + "="):
            out.append(a.split("=", 1)[1])
        elif a == flag and i + 1 < len(args):
            out.append(args[i + 1])
    return out


def parse_stack(spec):
    """--extra-stack's text-encoder=URL,prior=URL,... -> {key: URL}; None if malformed."""
    out = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if "=" not in part:
            return None
        k, v = part.split("=", 1)
        if k in out:
            return None
        out[k] = v
    return out


def qty(v):
    """A resource quantity as a comparable string (1 and "1" alike)."""
    return str(v)


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def subset(small, big):
    return all(big.get(k) == v for k, v in (small or {}).items())


def check_expect(c, label, exp, dep, ctr, flags, hpas, pdbs):
    """A profile's per-set expectations for one stage (its overrides merged over the top-level
    stage): replicas (fixed count), hpa (False: none; else min/max/cpu), requests/limits (exact),
    args ({flag: value}), node_selector (exact), pdb (subset of the spec), pod_labels (subset)."""
    res = ctr.get("resources", {})
    if "replicas" in exp:
        c.check(f"{label}: set override replicas = {exp['replicas']}",
                dep["spec"].get("replicas") == exp["replicas"], str(dep["spec"].get("replicas")))
    if exp.get("hpa") is False:
        c.check(f"{label}: set override autoscaling.enabled=false: no HPA", not hpas)
    elif "hpa" in exp:
        want = exp["hpa"]
        h = hpas[0]["spec"] if len(hpas) == 1 else {}
        cpu = next((m["resource"]["target"].get("averageUtilization") for m in h.get("metrics", [])
                    if m.get("type") == "Resource" and m["resource"]["name"] == "cpu"), None)
        got = dict(min=h.get("minReplicas"), max=h.get("maxReplicas"), cpu=cpu)
        c.check(f"{label}: HPA min/max/cpu target {want} (the stage's values with the set's overrides merged in)",
                got == want, str(got))
    for part in ("requests", "limits"):
        if part in exp:
            got = {k: qty(v) for k, v in (res.get(part) or {}).items()}
            want = {k: qty(v) for k, v in exp[part].items()}
            c.check(f"{label}: resources.{part} {want} (the stage's values with the set's overrides merged in)",
                    got == want, str(got))
    for flag, value in (exp.get("args") or {}).items():
        c.check(f"{label}: {flag}={value}", flags.get(flag) == value, str(flags.get(flag)))
    if "node_selector" in exp:
        ns = dep["spec"]["template"]["spec"].get("nodeSelector") or {}
        c.check(f"{label}: nodeSelector {exp['node_selector']}", ns == exp["node_selector"], str(ns))
    if "pdb" in exp:
        spec = pdbs[0]["spec"] if len(pdbs) == 1 else {}
        c.check(f"{label}: PDB {exp['pdb']}", len(pdbs) == 1 and subset(exp["pdb"], spec)
                and len({"minAvailable", "maxUnavailable"} & set(spec)) == 1, str(spec))
    if "pod_labels" in exp:
        labels = dep["spec"]["template"]["metadata"].get("labels", {})
        c.check(f"{label}: pod labels {exp['pod_labels']}", subset(exp["pod_labels"], labels), str(labels))


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

    # The model sets: the single-model shape is one set without a name (no suffix, no label).
    sets = []
    for mset in prof["sets"] or [dict(prof["single"], claim=("{fullname}-models", True) if prof["models"] == "pvc" else None)]:
        mset = dict(mset)
        if mset.get("claim"):
            mset["claim"] = (mset["claim"][0].format(fullname=opts.fullname), mset["claim"][1])
        sets.append(mset)
    sets_mode = prof["sets"] is not None

    def stage_name(key, setname):
        return f"{opts.fullname}-{STAGES[key]['component']}" + (f"-{setname}" if setname else "")

    def set_keys(mset):
        """The model stages a set runs: no prior in a prior-less set."""
        return [k for k in MODEL_KEYS if k != "prior" or mset.get("prior")]

    instances = [("gateway", None)] + [(key, mset) for mset in sets for key in set_keys(mset)]

    # Prior-less sets: no prior object of any kind, by name or by labels.
    for mset in sets:
        if mset.get("prior"):
            continue
        setname = mset["name"]
        label = f"prior[{setname}]" if setname else "prior"
        pname = stage_name("prior", setname)
        stray = [f'{d["kind"]}/{d["metadata"]["name"]}' for d in docs
                 if d["metadata"]["name"] in (pname, f"{pname}-metrics")
                 or (d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "prior"
                     and d["metadata"].get("labels", {}).get(SET_LABEL) == setname)]
        c.check(f"{label}: a prior-less set ({mset['decoder']}) renders no prior Deployment, Service, "
                "HPA, PDB or NetworkPolicy", not stray, str(stray))
    deployments = {}
    for key, mset in instances:
        st = STAGES[key]
        setname = mset["name"] if mset else None
        label = f"{key}[{setname}]" if setname else key
        exp = ((mset or {}).get("expect") or {}).get(key, {})
        name = stage_name(key, setname)
        dep = named("Deployment", name)
        if not c.check(f"{label}: Deployment {name} exists", dep is not None):
            continue
        deployments[(key, setname)] = dep
        pod = dep["spec"]["template"]
        spec = pod["spec"]
        pod_labels = pod["metadata"].get("labels", {})
        sel = dep["spec"]["selector"]["matchLabels"]
        c.check(f"{label}: selector matches its pod labels and names the component",
                subset(sel, pod_labels) and sel.get("app.kubernetes.io/component") == st["component"])
        # Selectors are immutable: the single-model shape keeps name/instance/component only.
        want_sel = SELECTOR_KEYS | ({SET_LABEL} if setname else set())
        c.check(f"{label}: selector labels are exactly {sorted(want_sel)}", set(sel) == want_sel, str(sel))
        if setname:
            c.check(f"{label}: Deployment, pods and selector carry {SET_LABEL}={setname}",
                    dep["metadata"]["labels"].get(SET_LABEL) == setname
                    and pod_labels.get(SET_LABEL) == setname and sel.get(SET_LABEL) == setname,
                    f'{dep["metadata"]["labels"].get(SET_LABEL)} {pod_labels.get(SET_LABEL)} {sel.get(SET_LABEL)}')
        else:
            c.check(f"{label}: no {SET_LABEL} label (not part of a model set)",
                    SET_LABEL not in dep["metadata"]["labels"] and SET_LABEL not in pod_labels)
        ctrs = spec["containers"]
        ctr = next((x for x in ctrs if x["name"] == st["component"]), None)
        if not c.check(f"{label}: container {st['component']} exists", ctr is not None):
            continue
        c.check(f"{label}: runs {st['binary']}", ctr.get("command") == [st["binary"]], str(ctr.get("command")))
        flags, order = parse_args(ctr.get("args", []))
        unknown = sorted(set(order) - FLAGS[st["binary"]])
        c.check(f"{label}: passes only flags {st['binary']} accepts (services/README.md)", not unknown, str(unknown))
        dup = sorted({f for f in order if order.count(f) > 1} - REPEATABLE_FLAGS)
        c.check(f"{label}: passes no flag twice", not dup, str(dup))
        ports = {p["name"]: p["containerPort"] for p in ctr.get("ports", [])}
        c.check(f"{label}: container ports named grpc and metrics", {"grpc", "metrics"} <= set(ports), str(ports))
        c.check(f"{label}: --listen / --metrics-listen match the grpc / metrics ports",
                "--listen" in flags and "--metrics-listen" in flags
                and port_of(flags["--listen"]) == ports.get("grpc")
                and port_of(flags["--metrics-listen"]) == ports.get("metrics"),
                f'{flags.get("--listen")} {flags.get("--metrics-listen")} {ports}')

        # Probes: native gRPC against grpc.health.v1 with the stage's service name; a gRPC port
        # that speaks TLS (which Kubernetes' gRPC probes cannot) is probed on /healthz instead.
        tls_port = prof["tls"] and (key != "gateway" or prof["tls_gateway"])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            p = ctr.get(probe) or {}
            if tls_port:
                h = p.get("httpGet") or {}
                c.check(f"{label}: {probe} is GET /healthz on the metrics port (TLS gRPC port)",
                        h.get("path") == "/healthz" and h.get("port") in ("metrics", ports.get("metrics"))
                        and "grpc" not in p, str(p))
                continue
            g = p.get("grpc") or {}
            c.check(f"{label}: {probe} is gRPC health on the grpc port for service {st['health']}",
                    g.get("service") == st["health"] and g.get("port") == ports.get("grpc"), str(p))

        # TLS: the certificate Secret on a read-only mount (no subPath: renewals reach the pod).
        tls_flags = {f: v for f, v in flags.items() if "tls" in f}
        if prof["tls"]:
            want = {"--tls-cert": f"{TLS_DIR}/tls.crt", "--tls-key": f"{TLS_DIR}/tls.key"} if tls_port else {}
            if key == "gateway":
                want.update({"--stage-tls-ca": f"{TLS_DIR}/ca.crt",
                             "--stage-tls-cert": f"{TLS_DIR}/tls.crt",
                             "--stage-tls-key": f"{TLS_DIR}/tls.key"})
            else:
                want["--tls-client-ca"] = f"{TLS_DIR}/ca.crt"
            c.check(f"{label}: TLS flags point into the certificate mount", tls_flags == want,
                    f"{tls_flags} != {want}")
            tm = [m for m in ctr.get("volumeMounts", []) if m["mountPath"].rstrip("/") == TLS_DIR]
            tv = {v["name"]: v for v in spec.get("volumes", [])}
            sec = (tv.get(tm[0]["name"], {}) if tm else {}).get("secret") or {}
            c.check(f"{label}: the certificate is a read-only Secret mount of {opts.fullname}-tls",
                    len(tm) == 1 and tm[0].get("readOnly") is True and "subPath" not in tm[0]
                    and sec.get("secretName") == f"{opts.fullname}-tls"
                    and {i.get("key") for i in sec.get("items", [])} == {"tls.crt", "tls.key", "ca.crt"},
                    f"{tm} {sec}")
        else:
            c.check(f"{label}: no TLS flags without tls.enabled", not tls_flags, str(tls_flags))
        sp = ctr.get("startupProbe") or {}
        budget = sp.get("failureThreshold", 3) * sp.get("periodSeconds", 10)
        c.check(f"{label}: startup probe allows >= {MIN_STARTUP_S[key]} s for loading ({budget} s)",
                budget >= MIN_STARTUP_S[key])

        # GPU placement.
        res = ctr.get("resources", {})
        gpu_req = {k: v for part in ("limits", "requests") for k, v in (res.get(part) or {}).items()
                   if k == GPU_RESOURCE}
        ns = spec.get("nodeSelector") or {}
        tol = spec.get("tolerations") or []
        gpu_tol = [t for t in tol if t.get("key") == GPU_TAINT_KEY]
        image = ctr.get("image", "")
        gpu_stage = exp.get("gpu_stage", key in prof["gpu_stages"])
        if gpu_stage:
            c.check(f"{label}: limits {GPU_RESOURCE} >= 1",
                    int((res.get("limits") or {}).get(GPU_RESOURCE, 0)) >= 1, str(res))
            c.check(f"{label}: GPU node selector {prof['gpu_selector']}",
                    subset(prof["gpu_selector"], ns) and prof["gpu_selector"], str(ns))
            c.check(f"{label}: tolerates the {GPU_TAINT_KEY} NoSchedule taint",
                    any(t.get("effect") == "NoSchedule" and t.get("operator") in ("Exists", "Equal")
                        for t in gpu_tol), str(tol))
            c.check(f"{label}: --device=cuda:N", re.fullmatch(r"cuda:\d+", flags.get("--device") or "") is not None,
                    str(flags.get("--device")))
            c.check(f"{label}: runs the CUDA image", image.endswith("-cuda"), image)
        else:
            c.check(f"{label}: no {GPU_RESOURCE} requests or limits", not gpu_req, str(res))
            c.check(f"{label}: no GPU node selector",
                    not any("gpu" in k or "accelerator" in k for k in ns), str(ns))
            c.check(f"{label}: no GPU toleration", not gpu_tol, str(tol))
            c.check(f"{label}: runs the CPU image", not image.endswith("-cuda"), image)
            if st["model"]:
                c.check(f"{label}: --device=cpu", flags.get("--device") == "cpu", str(flags.get("--device")))
            else:
                c.check(f"{label}: no --device flag (the gateway holds no model)", "--device" not in flags)
        if st["model"]:
            c.check(f"{label}: --dtype given", flags.get("--dtype") in ("f32", "f16", "bf16"), str(flags.get("--dtype")))
            if not gpu_stage:
                c.check(f"{label}: f32 on CPU", flags.get("--dtype") == "f32", str(flags.get("--dtype")))

        # Model volume: read-only, the right folder.
        mounts = ctr.get("volumeMounts", [])
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        if st["model"]:
            md = flags.get("--model-dir") or ""
            # A prior-less set has one folder: its text-encoder reads the decoder folder.
            model = st["model"] if mset.get(st["model"]) else "decoder"
            folder = f"{MODELS_MOUNT}/{mset[model]}"
            c.check(f"{label}: --model-dir is the set's {model} folder ({folder})"
                    + (" (a prior-less set's one folder)" if model != st["model"] else ""), md == folder, md)
            m = [x for x in mounts if md == x["mountPath"] or md.startswith(x["mountPath"].rstrip("/") + "/")]
            c.check(f"{label}: --model-dir lies on a read-only volume mount",
                    m and all(x.get("readOnly") is True for x in m), str(m))
            if m:
                v = vols.get(m[0]["name"], {})
                if prof["models"] == "pvc":
                    pvc = v.get("persistentVolumeClaim") or {}
                    c.check(f"{label}: model volume is the models PVC, read-only",
                            pvc.get("readOnly") is True and bool(pvc.get("claimName")), str(v))
                    claim, created = mset["claim"]
                    c.check(f"{label}: mounts the claim {claim}", pvc.get("claimName") == claim, pvc.get("claimName"))
                    rendered = named("PersistentVolumeClaim", claim) is not None
                    c.check(f"{label}: the claim is " + ("rendered by the chart" if created else "an existing one (not rendered)"),
                            rendered == created, claim)
                elif prof["models"] == "hostPath":
                    c.check(f"{label}: model volume is a hostPath", "hostPath" in v, str(v))
            if key == "textEncoder" and not mset.get("prior"):
                c.check(f"{label}: no --decoder-model-dir (a prior-less set has one folder)",
                        "--decoder-model-dir" not in flags, str(flags.get("--decoder-model-dir")))
            elif key == "textEncoder":
                dd = flags.get("--decoder-model-dir") or ""
                c.check(f"{label}: --decoder-model-dir is the set's decoder folder (2.1's XLM-R)",
                        dd == f"{MODELS_MOUNT}/{mset['decoder']}", dd)
                c.check(f"{label}: --decoder-model-dir lies on a read-only volume mount",
                        any(dd.startswith(x["mountPath"].rstrip("/") + "/") and x.get("readOnly") is True
                            for x in mounts), dd)
        else:
            c.check(f"{label}: no model volume (holds no model)", "--model-dir" not in flags)
        rw = [x["mountPath"] for x in mounts if x["name"] != "tmp" and x.get("readOnly") is not True]
        c.check(f"{label}: every mount but /tmp is read-only", not rw, str(rw))

        # Security.
        psc = spec.get("securityContext") or {}
        csc = ctr.get("securityContext") or {}
        c.check(f"{label}: runs as non-root with a read-only root filesystem",
                (psc.get("runAsNonRoot") or csc.get("runAsNonRoot")) is True
                and csc.get("readOnlyRootFilesystem") is True
                and csc.get("allowPrivilegeEscalation") is False
                and "ALL" in ((csc.get("capabilities") or {}).get("drop") or []), f"{psc} {csc}")
        c.check(f"{label}: no service account token mounted", spec.get("automountServiceAccountToken") is False)
        grace = spec.get("terminationGracePeriodSeconds", 30)
        pre = (((ctr.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command", [])
        pre_s = int(pre[-1]) if pre and pre[0] == "sleep" else 0
        c.check(f"{label}: terminationGracePeriodSeconds ({grace}) >= 60 and covers the preStop sleep ({pre_s})",
                grace >= 60 and grace > pre_s + 30)

        # Metrics.
        ann = pod["metadata"].get("annotations", {})
        c.check(f"{label}: prometheus.io scrape annotations name the metrics port",
                ann.get("prometheus.io/scrape") == "true"
                and ann.get("prometheus.io/port") == str(ports.get("metrics")), str(ann))

        # Redis.
        env = {e["name"]: e for e in ctr.get("env", [])}
        if st["redis"] and prof["redis"] == "chart":
            url = (env.get("KD_REDIS_URL") or {}).get("value", "")
            want = f"redis://{redis_svc['metadata']['name']}:{redis_svc['spec']['ports'][0]['port']}/" if redis_svc else None
            c.check(f"{label}: KD_REDIS_URL points at the chart's Redis Service",
                    want is not None and url.startswith(want), f"{url} vs {want}")
        elif st["redis"] and prof["redis"] == "external-secret":
            ref = ((env.get("KD_REDIS_URL") or {}).get("valueFrom") or {}).get("secretKeyRef")
            c.check(f"{label}: KD_REDIS_URL comes from a Secret", bool(ref), str(env.get("KD_REDIS_URL")))
        else:
            c.check(f"{label}: no Redis URL (the binary takes none)", "KD_REDIS_URL" not in env and "--redis-url" not in flags)

        # HPA and PDB.
        hpas = [h for h in by_kind.get("HorizontalPodAutoscaler", [])
                if h["spec"]["scaleTargetRef"].get("kind") == "Deployment"
                and h["spec"]["scaleTargetRef"].get("name") == name]
        if key in prof["hpa_off"] or exp.get("hpa") is False:
            c.check(f"{label}: no HPA and a fixed replica count", not hpas and dep["spec"].get("replicas", 0) >= 1)
        else:
            ok = (len(hpas) == 1 and hpas[0]["apiVersion"] == "autoscaling/v2"
                  and hpas[0]["spec"]["scaleTargetRef"].get("apiVersion") == "apps/v1"
                  and 1 <= hpas[0]["spec"].get("minReplicas", 1) <= hpas[0]["spec"]["maxReplicas"]
                  and bool(hpas[0]["spec"].get("metrics")))
            c.check(f"{label}: one autoscaling/v2 HPA targets the Deployment (1 <= min <= max, metrics set)", ok,
                    str([h["spec"] for h in hpas]))
            c.check(f"{label}: Deployment leaves replicas to the HPA", "replicas" not in dep["spec"])
            if hpas and any(m.get("type") == "Resource" and m["resource"]["name"] == "cpu"
                            for m in hpas[0]["spec"].get("metrics", [])):
                c.check(f"{label}: CPU-utilisation HPA has a CPU request to measure against",
                        "cpu" in (res.get("requests") or {}), str(res))
        pdbs = [p for p in by_kind.get("PodDisruptionBudget", [])
                if p["apiVersion"] == "policy/v1"
                and subset(p["spec"]["selector"].get("matchLabels"), pod_labels)
                and p["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/component") == st["component"]]
        c.check(f"{label}: one policy/v1 PDB selects exactly this stage's pods",
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
            c.check(f"{label}: Service {name} is headless (clusterIP: None), ready pods only", ok,
                    str([s["spec"] for s in grpc_svcs]))
        for s in grpc_svcs:
            gp = next(p for p in s["spec"]["ports"] if p["name"] == "grpc")
            c.check(f"{label}: Service {s['metadata']['name']} grpc port targets the container's grpc port",
                    gp.get("targetPort") in ("grpc", ports.get("grpc")), str(gp))
        c.check(f"{label}: a Service exposes the metrics port (for the ServiceMonitor)", len(metric_svcs) == 1,
                str([s["metadata"]["name"] for s in metric_svcs]))
        if setname:
            c.check(f"{label}: its Services, HPA and PDB carry {SET_LABEL}={setname}",
                    all(o["metadata"]["labels"].get(SET_LABEL) == setname for o in svcs + hpas + pdbs),
                    str([o["metadata"]["name"] for o in svcs + hpas + pdbs
                         if o["metadata"]["labels"].get(SET_LABEL) != setname]))
        if exp:
            check_expect(c, label, exp, dep, ctr, flags, hpas, pdbs)

    # --- network policies ------------------------------------------------------------------------
    nps = by_kind.get("NetworkPolicy", [])
    if prof["network_policy"] and ("gateway", None) in deployments:
        gw_labels = deployments[("gateway", None)]["spec"]["template"]["metadata"]["labels"]
        for (key, setname), dep in deployments.items():
            label = f"{key}[{setname}]" if setname else key
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
                c.check(f"{label}: NetworkPolicy admits gRPC from the gateway only", ok, str(grpc_rules))
    else:
        c.check("no NetworkPolicy unless enabled", not nps)

    # --- gateway wiring --------------------------------------------------------------------
    gw = deployments.get(("gateway", None))

    def stage_url(key, setname):
        """http://<Service>:<grpc port> of a stage's headless Service, None if it is missing."""
        svc = named("Service", stage_name(key, setname))
        if not svc or svc["spec"].get("clusterIP") != "None":
            return None
        port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
        return f"http://{svc['metadata']['name']}:{port}"

    if gw:
        gctr = gw["spec"]["template"]["spec"]["containers"][0]
        gflags, _ = parse_args(gctr.get("args", []))
        # The first set is the default model: the --*-url flags.
        first = sets[0]["name"]
        for key, flag in URL_FLAGS.items():
            if key == "prior" and not sets[0].get("prior"):
                c.check("gateway: --prior-url none (the default model set has no prior)"
                        + (f" [{first}]" if first else ""), gflags.get(flag) == "none", str(gflags.get(flag)))
                continue
            want = stage_url(key, first)
            c.check(f"gateway: {flag} points at the headless {STAGES[key]['component']} Service"
                    + (f" of the default set {first}" if first else "") + f" ({want})",
                    want is not None and gflags.get(flag) == want, str(gflags.get(flag)))
        # Every other set: one --extra-stack each, in values order, naming that set's Services.
        stacks = flag_values(gctr.get("args", []), "--extra-stack")
        c.check(f"gateway: one --extra-stack per extra model set ({len(sets) - 1})",
                len(stacks) == len(sets) - 1, str(stacks))
        for i, mset in enumerate(sets[1:]):
            want = {STAGES[key]["component"]: stage_url(key, mset["name"]) for key in set_keys(mset)}
            got = parse_stack(stacks[i]) if i < len(stacks) else None
            what = ("text-encoder, prior, denoiser and movq" if mset.get("prior")
                    else "text-encoder, denoiser and movq, no prior= (a prior-less set)")
            c.check(f"gateway: --extra-stack #{i + 1} is set {mset['name']}: {what} at its headless Services",
                    None not in want.values() and got == want, f"{got} != {want}")
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
            every = [stage_name(key, mset["name"] if mset else None) for key, mset in instances]
            missing = [n for n in every if n not in names]
            c.check(f"tls: the certificate names every stage Service of every set ({len(every)}; "
                    "the host of each stage URL)", not missing, str(missing))
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
            want = {STAGES[key]["component"] for key, _ in instances}
            c.check("monitoring: it selects a metrics Service of every stage", want <= scraped,
                    f"missing {sorted(want - scraped)}")
            meta = "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", SET_LABEL)
            relabel = [r for e in sm.get("endpoints", []) for r in e.get("relabelings") or []
                       if r.get("targetLabel") == "model_set"]
            if sets_mode:
                c.check(f"monitoring: series get model_set from the pods' {SET_LABEL} label",
                        len(relabel) == 1 and relabel[0].get("sourceLabels") == [meta]
                        and relabel[0].get("action", "replace").lower() == "replace", str(relabel))
            else:
                c.check("monitoring: no model_set relabeling without model sets", not relabel, str(relabel))
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
            if CHART_DASHBOARD in data and not bad:
                dash = json.loads(data[CHART_DASHBOARD])
                var = next((v for v in (dash.get("templating") or {}).get("list", [])
                            if v.get("name") == "model_set"), None)
                c.check(f"dashboards: {CHART_DASHBOARD} has a model_set variable whose All also matches "
                        "series without the label (gateway, one-model releases)",
                        var is not None and var.get("includeAll") is True and var.get("allValue") == ".*",
                        str(var))
                exprs = [t.get("expr", "") for pn in dash.get("panels", []) for t in pn.get("targets", [])]
                unfiltered = [e for e in exprs if e.count("kd_") != e.count('model_set=~"$model_set"')]
                c.check(f"dashboards: every {CHART_DASHBOARD} query filters on $model_set",
                        exprs and not unfiltered, str(unfiltered))
    else:
        c.check("dashboards: no dashboard ConfigMap when dashboards/ has no JSON file", not cms)

    # --- model sets: one stage set each, nothing shared by accident --------------------------
    keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
    dups = sorted({k for k in keys if keys.count(k) > 1})
    c.check("every object's kind and name are unique", not dups, str(dups))
    deps = by_kind.get("Deployment", [])
    overlap = [(a["metadata"]["name"], b["metadata"]["name"]) for a in deps for b in deps
               if a is not b and subset(a["spec"]["selector"]["matchLabels"],
                                        b["spec"]["template"]["metadata"].get("labels", {}))]
    c.check("no Deployment's selector matches another Deployment's pods", not overlap, str(overlap))
    n_stages = sum(len(set_keys(mset)) for mset in sets)
    c.check(f"Deployments: the gateway + 4 per model set, 3 per prior-less set ({1 + n_stages})",
            len(deps) == 1 + n_stages, str(len(deps)))
    if sets_mode:
        for mset in sets:
            n = mset["name"]
            mine = lambda kind: sorted(d["metadata"]["name"] for d in by_kind.get(kind, [])
                                       if d["metadata"].get("labels", {}).get(SET_LABEL) == n)
            ks = set_keys(mset)
            no_hpa = sum(1 for key in ks
                         if key in prof["hpa_off"] or ((mset.get("expect") or {}).get(key) or {}).get("hpa") is False)
            want = {"Deployment": len(ks), "Service": len(ks), "HorizontalPodAutoscaler": len(ks) - no_hpa,
                    "PodDisruptionBudget": len(ks), "NetworkPolicy": len(ks) if prof["network_policy"] else 0}
            got = {kind: len(mine(kind)) for kind in want}
            c.check(f"set {n}: {want['Deployment']} Deployments, {want['Service']} Services, "
                    f"{want['HorizontalPodAutoscaler']} HPAs, {want['PodDisruptionBudget']} PDBs, "
                    f"{want['NetworkPolicy']} NetworkPolicies labelled {SET_LABEL}={n}", got == want, str(got))
            c.check(f"set {n}: its objects are named <fullname>-<component>-{n}",
                    all(x.endswith(f"-{n}") for kind in ("Deployment", "Service", "HorizontalPodAutoscaler",
                                                         "PodDisruptionBudget", "NetworkPolicy")
                        for x in mine(kind)), "")
            if mset.get("claim_spec") and mset.get("claim"):
                pvc = named("PersistentVolumeClaim", mset["claim"][0]) or {}
                spec = pvc.get("spec", {})
                got = {"storageClassName": spec.get("storageClassName"),
                       "storage": spec.get("resources", {}).get("requests", {}).get("storage")}
                c.check(f"set {n}: its own claim {mset['claim'][0]} takes the set's volume values "
                        f"(labelled {SET_LABEL}={n})",
                        got == mset["claim_spec"] and pvc.get("metadata", {}).get("labels", {}).get(SET_LABEL) == n,
                        str(got))
    else:
        labelled = [f'{d["kind"]}/{d["metadata"]["name"]}' for d in docs
                    if SET_LABEL in d["metadata"].get("labels", {})]
        c.check(f"single model: no object carries {SET_LABEL}", not labelled, str(labelled))

    print(f"chart assertions [{opts.profile}]: {c.passed} passed, {c.failed} failed")
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
