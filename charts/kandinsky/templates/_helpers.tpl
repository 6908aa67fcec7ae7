{{/*
Names, labels and the per-stage facts every template shares.
*/}}

{{- define "kandinsky.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-kandinsky, or the release name when it already contains the chart name. */}}
{{- define "kandinsky.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kandinsky.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kandinsky.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kandinsky.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kandinsky.labels" -}}
helm.sh/chart: {{ include "kandinsky.chart" . }}
{{ include "kandinsky.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kandinsky-serve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The stages, keyed by their values key (in pipeline order: gateway, textEncoder, prior, denoiser,
movq; kandinsky.stageInstances lists them, the model stages once per model set). For each:
component (resource name suffix and app.kubernetes.io/component), binary, gRPC health service
name, which checkpoint folder it loads ("" = none), and whether it takes --redis-url (see
services/README.md).
*/}}

{{- define "kandinsky.stageMeta" -}}
gateway:
  component: gateway
  binary: kd-gateway
  grpcService: kandinsky.v1.Gateway
  model: ""
  redis: true
textEncoder:
  component: text-encoder
  binary: kd-text-encoder
  grpcService: kandinsky.v1.TextEncoder
  model: prior
  redis: true
prior:
  component: prior
  binary: kd-prior
  grpcService: kandinsky.v1.Prior
  model: prior
  redis: true
denoiser:
  component: denoiser
  binary: kd-denoiser
  grpcService: kandinsky.v1.Denoiser
  model: decoder
  redis: false
movq:
  component: movq
  binary: kd-movq
  grpcService: kandinsky.v1.Movq
  model: decoder
  redis: false
{{- end }}

{{/* The label naming a model stage set (models.sets[].name); absent in the single-model shape. */}}
{{- define "kandinsky.setLabelKey" -}}
kandinsky-serve/model-set
{{- end }}

{{/*
Call with (list $ "prior") or (list $ "prior" SET): the stage's full resource name. SET is a
models.sets[].name ("" or absent: the single-model shape and the gateway, <fullname>-<component>).
A set's stages are <fullname>-<component>-<set>; the prefix is cut to the same length for every
set of the release so that the longest set name still fits 63 characters.
*/}}
{{- define "kandinsky.stageFullname" -}}
{{- $root := index . 0 }}
{{- $meta := get (include "kandinsky.stageMeta" $root | fromYaml) (index . 1) }}
{{- $set := "" }}
{{- if gt (len .) 2 }}{{ $set = index . 2 }}{{ end }}
{{- if $set }}
{{- $longest := 0 }}
{{- range $root.Values.models.sets }}
{{- $longest = max $longest (len (toString .name)) }}
{{- end }}
{{- /* 63 - len("-text-encoder-") - the longest set name, and never more than the plain names' 47. */}}
{{- $prefix := min 47 (sub 49 $longest) }}
{{- printf "%s-%s-%s" (include "kandinsky.fullname" $root | trunc (int $prefix) | trimSuffix "-") $meta.component $set }}
{{- else }}
{{- printf "%s-%s" (include "kandinsky.fullname" $root | trunc 47 | trimSuffix "-") $meta.component }}
{{- end }}
{{- end }}

{{/* Call with (list $ "prior") or (list $ "prior" SET). */}}
{{- define "kandinsky.stageSelectorLabels" -}}
{{- $root := index . 0 }}
{{- $meta := get (include "kandinsky.stageMeta" $root | fromYaml) (index . 1) }}
{{- include "kandinsky.selectorLabels" $root }}
app.kubernetes.io/component: {{ $meta.component }}
{{- if and (gt (len .) 2) (index . 2) }}
{{ include "kandinsky.setLabelKey" $root }}: {{ index . 2 }}
{{- end }}
{{- end }}

{{/* Call with (list $ "prior") or (list $ "prior" SET). */}}
{{- define "kandinsky.stageLabels" -}}
{{- $root := index . 0 }}
{{- $meta := get (include "kandinsky.stageMeta" $root | fromYaml) (index . 1) }}
{{- include "kandinsky.labels" $root }}
app.kubernetes.io/component: {{ $meta.component }}
{{- if and (gt (len .) 2) (index . 2) }}
{{ include "kandinsky.setLabelKey" $root }}: {{ index . 2 }}
{{- end }}
{{- end }}

{{/*
Call with (list DST SRC): deep-merges map SRC into map DST (DST is changed). Maps merge key by
key, anything else (lists included) replaces, and a null deletes the key (as Helm does for values).
*/}}
{{- define "kandinsky.mergeInto" -}}
{{- $dst := index . 0 }}
{{- range $k, $v := index . 1 }}
{{- if kindIs "invalid" $v }}
{{- $_ := unset $dst $k }}
{{- else if and (kindIs "map" $v) (kindIs "map" (get $dst $k)) }}
{{- include "kandinsky.mergeInto" (list (get $dst $k) $v) }}
{{- else }}
{{- $_ := set $dst $k $v }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The model stage sets, as JSON {"sets": [...]}; the first is the default model. Each set: name
("" in the single-model shape: unsuffixed names, no set label), index, priorDir, decoderDir,
hasPrior (false when priorDir is empty or absent: a prior-less set such as an aMUSEd or Kandinsky 2.0 folder,
served by text-encoder, denoiser and movq only; the text-encoder then reads decoderDir),
ownVolume (a set with its own `volume`), volume (the volume values it mounts), claimName (its
claim, for type persistentVolumeClaim), createClaim (the chart creates that claim) and stages
(textEncoder/prior/denoiser/movq: the top-level stage values with the set's overrides merged in).
models.sets empty: one set from models.priorDir/decoderDir/volume and the top-level stages.
*/}}
{{- define "kandinsky.modelSets" -}}
{{- $root := . }}
{{- $m := .Values.models }}
{{- $entries := $m.sets | default list }}
{{- $single := not $entries }}
{{- if $single }}
{{- $entries = list (dict "name" "" "priorDir" $m.priorDir "decoderDir" $m.decoderDir) }}
{{- end }}
{{- $out := list }}
{{- $seen := dict }}
{{- range $i, $e := $entries }}
{{- $name := toString ($e.name | default "") }}
{{- if not $single }}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$" $name) }}
{{- fail (printf "models.sets[%d].name %q: must be a DNS label of at most 32 characters (lower-case letters, digits and '-'; it suffixes the set's resource names)" $i $name) }}
{{- end }}
{{- if hasKey $seen $name }}
{{- fail (printf "models.sets: set name %q is used twice (models.sets[%d] and models.sets[%d]); set names must be unique" $name (int (get $seen $name)) $i) }}
{{- end }}
{{- $_ := set $seen $name $i }}
{{- end }}
{{- $ownVolume := and (not $single) (hasKey $e "volume") (not (empty $e.volume)) }}
{{- $volume := deepCopy $m.volume }}
{{- if $ownVolume }}
{{- $ev := deepCopy $e.volume }}
{{- /* A pod volume source replaces, never merges (two sources in one volume are invalid). */}}
{{- if hasKey $ev "custom" }}
{{- $_ := set $volume "custom" ($ev.custom | default dict) }}
{{- $_ := unset $ev "custom" }}
{{- end }}
{{- include "kandinsky.mergeInto" (list $volume $ev) }}
{{- end }}
{{- $pvc := $volume.persistentVolumeClaim | default dict }}
{{- $claimName := "" }}
{{- $createClaim := false }}
{{- if eq $volume.type "persistentVolumeClaim" }}
{{- if $pvc.existingClaim }}
{{- $claimName = $pvc.existingClaim }}
{{- else if $ownVolume }}
{{- $claimName = printf "%s-models-%s" (include "kandinsky.fullname" $root | trunc (int (sub 55 (len $name))) | trimSuffix "-") $name }}
{{- $createClaim = true }}
{{- else }}
{{- $claimName = printf "%s-models" (include "kandinsky.fullname" $root | trunc 56 | trimSuffix "-") }}
{{- $createClaim = true }}
{{- end }}
{{- end }}
{{- $priorDir := toString ($e.priorDir | default "") }}
{{- $hasPrior := ne $priorDir "" }}
{{- if and (not $hasPrior) (not $single) (hasKey $e "prior") (get $e "prior") }}
{{- fail (printf "models.sets[%d].prior: set %q has no priorDir (a prior-less set, e.g. an aMUSEd folder: text-encoder, denoiser and movq only), so it runs no prior stage to override; remove models.sets[%d].prior or give the set a priorDir" $i $name $i) }}
{{- end }}
{{- $stages := dict }}
{{- range $key := list "textEncoder" "prior" "denoiser" "movq" }}
{{- $s := deepCopy (get $root.Values $key) }}
{{- if and (not $single) (hasKey $e $key) (get $e $key) }}
{{- include "kandinsky.mergeInto" (list $s (deepCopy (get $e $key))) }}
{{- end }}
{{- $_ := set $stages $key $s }}
{{- end }}
{{- $out = append $out (dict "name" $name "index" $i "priorDir" $priorDir "decoderDir" $e.decoderDir "hasPrior" $hasPrior "ownVolume" $ownVolume "volume" $volume "claimName" $claimName "createClaim" $createClaim "stages" $stages) }}
{{- end }}
{{- toJson (dict "sets" $out) }}
{{- end }}

{{/*
Every stage instance, in order, as JSON {"items": [...]}: the gateway, then each set's
textEncoder, prior, denoiser and movq (no prior for a prior-less set: no Deployment, Service,
HPA, PDB, NetworkPolicy or certificate name for it). Each: key (values key), set (the set's
name, "" for the gateway and the single-model shape), setIndex (-1 for the gateway), values (the stage's
effective values), name (resource name).
*/}}
{{- define "kandinsky.stageInstances" -}}
{{- $root := . }}
{{- $items := list (dict "key" "gateway" "set" "" "setIndex" -1 "values" .Values.gateway "name" (include "kandinsky.stageFullname" (list $root "gateway"))) }}
{{- range $set := (include "kandinsky.modelSets" . | fromJson).sets }}
{{- range $key := list "textEncoder" "prior" "denoiser" "movq" }}
{{- if or $set.hasPrior (ne $key "prior") }}
{{- $items = append $items (dict "key" $key "set" $set.name "setIndex" $set.index "values" (get $set.stages $key) "name" (include "kandinsky.stageFullname" (list $root $key $set.name))) }}
{{- end }}
{{- end }}
{{- end }}
{{- toJson (dict "items" $items) }}
{{- end }}

{{/* Call with (list $ STAGEVALUES): repository:tag of the stage's image. */}}
{{- define "kandinsky.stageImage" -}}
{{- $root := index . 0 }}
{{- $s := index . 1 }}
{{- $repo := $s.image.repository | default $root.Values.image.repository }}
{{- $tag := $s.image.tag }}
{{- if not $tag }}
{{- $tag = $root.Values.image.tag | default $root.Chart.AppVersion }}
{{- if and $s.gpu $s.gpu.enabled }}
{{- $tag = printf "%s%s" $tag $root.Values.image.cudaTagSuffix }}
{{- end }}
{{- end }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}

{{- define "kandinsky.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kandinsky.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kandinsky.redisFullname" -}}
{{- printf "%s-redis" (include "kandinsky.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{/* Name of the Secret holding the API keys file. */}}
{{- define "kandinsky.apiKeysSecretName" -}}
{{- if .Values.auth.existingSecret }}
{{- .Values.auth.existingSecret }}
{{- else }}
{{- printf "%s-api-keys" (include "kandinsky.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{/* Name of the shared models PVC (created or existing): models.volume. */}}
{{- define "kandinsky.modelsClaimName" -}}
{{- $pvc := .Values.models.volume.persistentVolumeClaim }}
{{- if $pvc.existingClaim }}
{{- $pvc.existingClaim }}
{{- else }}
{{- printf "%s-models" (include "kandinsky.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{/* Call with (list $ SET), SET an entry of kandinsky.modelSets: its models volume source (without name). */}}
{{- define "kandinsky.modelsVolumeSource" -}}
{{- $set := index . 1 }}
{{- $v := $set.volume }}
{{- $where := "models.volume" }}
{{- if $set.ownVolume }}
{{- $where = printf "models.sets[%d].volume" (int $set.index) }}
{{- end }}
{{- if eq $v.type "persistentVolumeClaim" }}
persistentVolumeClaim:
  claimName: {{ $set.claimName }}
  readOnly: true
{{- else if eq $v.type "hostPath" }}
hostPath:
  path: {{ $v.hostPath.path }}
  type: {{ $v.hostPath.type }}
{{- else if eq $v.type "custom" }}
{{- if not $v.custom }}
{{- fail (printf "%s.type is custom but %s.custom is empty: give a pod volume source, e.g. {nfs: {server: ..., path: ...}}" $where $where) }}
{{- end }}
{{- toYaml $v.custom }}
{{- end }}
{{- end }}

{{/*
Call with (list $ KEY SET): --model-dir of model stage KEY of SET (an entry of kandinsky.modelSets).
The prior folder's stages (text-encoder, prior) read the decoder folder in a prior-less set.
*/}}
{{- define "kandinsky.modelDir" -}}
{{- $root := index . 0 }}
{{- $key := index . 1 }}
{{- $set := index . 2 }}
{{- $s := get $set.stages $key }}
{{- $meta := get (include "kandinsky.stageMeta" $root | fromYaml) $key }}
{{- if $s.modelDir }}
{{- $s.modelDir }}
{{- else if and (eq $meta.model "prior") $set.hasPrior }}
{{- printf "%s/%s" (trimSuffix "/" $root.Values.models.mountPath) $set.priorDir }}
{{- else }}
{{- printf "%s/%s" (trimSuffix "/" $root.Values.models.mountPath) $set.decoderDir }}
{{- end }}
{{- end }}

{{/*
Call with (list $ KEY SET): the URL the gateway uses for stage KEY of SET (an entry of
kandinsky.modelSets); gateway.stageUrls overrides those of the first (default) set. The prior of a
prior-less set is "none" (the gateway's --prior-url none; --extra-stack leaves prior= out).
*/}}
{{- define "kandinsky.stageUrl" -}}
{{- $root := index . 0 }}
{{- $key := index . 1 }}
{{- $set := index . 2 }}
{{- $override := "" }}
{{- if eq (int $set.index) 0 }}
{{- $override = get $root.Values.gateway.stageUrls $key }}
{{- end }}
{{- if and (eq $key "prior") (not $set.hasPrior) }}
{{- if $override }}
{{- fail "gateway.stageUrls.prior is set but the default model set has no prior (its priorDir is empty): leave gateway.stageUrls.prior empty (the gateway gets --prior-url none)" }}
{{- end }}
{{- "none" }}
{{- else if $override }}
{{- $override }}
{{- else }}
{{- printf "http://%s:%v" (include "kandinsky.stageFullname" (list $root $key $set.name)) $root.Values.ports.grpc }}
{{- end }}
{{- end }}

{{/* The Redis URL as an env var entry list, or nothing when no Redis is configured. */}}
{{- define "kandinsky.redisEnv" -}}
{{- $r := .Values.redis }}
{{- if $r.enabled }}
- name: KD_REDIS_URL
  value: {{ printf "redis://%s:%v/%v" (include "kandinsky.redisFullname" .) $r.port $r.database | quote }}
{{- else if $r.external.existingSecret }}
- name: KD_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $r.external.existingSecret }}
      key: {{ $r.external.existingSecretKey }}
{{- else if $r.external.url }}
- name: KD_REDIS_URL
  value: {{ $r.external.url | quote }}
{{- end }}
{{- end }}

{{/* The Secret holding tls.crt, tls.key and ca.crt (tls.enabled). */}}
{{- define "kandinsky.tlsSecretName" -}}
{{- if .Values.tls.existingSecret -}}
{{- .Values.tls.existingSecret -}}
{{- else if .Values.tls.certManager.enabled -}}
{{- printf "%s-tls" (include "kandinsky.fullname" .) -}}
{{- else -}}
{{- fail "tls.enabled needs tls.existingSecret or tls.certManager.enabled" -}}
{{- end -}}
{{- end }}

{{/* Whether the gRPC port of stage `key` speaks TLS (list root key). */}}
{{- define "kandinsky.grpcTls" -}}
{{- $root := index . 0 }}
{{- $key := index . 1 }}
{{- if and $root.Values.tls.enabled (or (ne $key "gateway") $root.Values.tls.gateway) -}}
true
{{- end -}}
{{- end }}
