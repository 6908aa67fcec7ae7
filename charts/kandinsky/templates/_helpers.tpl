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
The stages, in pipeline order, keyed by their values key. For each: component (resource name
suffix and app.kubernetes.io/component), binary, gRPC health service name, which checkpoint
folder it loads ("" = none), and whether it takes --redis-url (see services/README.md).
*/}}
{{- define "kandinsky.stageKeys" -}}
["gateway", "textEncoder", "prior", "denoiser", "movq"]
{{- end }}

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

{{/* Call with (list $ "prior"): the stage's full resource name. */}}
{{- define "kandinsky.stageFullname" -}}
{{- $root := index . 0 }}
{{- $meta := get (include "kandinsky.stageMeta" $root | fromYaml) (index . 1) }}
{{- printf "%s-%s" (include "kandinsky.fullname" $root | trunc 47 | trimSuffix "-") $meta.component }}
{{- end }}

{{/* Call with (list $ "prior"). */}}
{{- define "kandinsky.stageSelectorLabels" -}}
{{- $root := index . 0 }}
{{- $meta := get (include "kandinsky.stageMeta" $root | fromYaml) (index . 1) }}
{{- include "kandinsky.selectorLabels" $root }}
app.kubernetes.io/component: {{ $meta.component }}
{{- end }}

{{/* Call with (list $ "prior"). */}}
{{- define "kandinsky.stageLabels" -}}
{{- $root := index . 0 }}
{{- $meta := get (include "kandinsky.stageMeta" $root | fromYaml) (index . 1) }}
{{- include "kandinsky.labels" $root }}
app.kubernetes.io/component: {{ $meta.component }}
{{- end }}

{{/* Call with (list $ "prior"): repository:tag of the stage's image. */}}
{{- define "kandinsky.stageImage" -}}
{{- $root := index . 0 }}
{{- $s := get $root.Values (index . 1) }}
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

{{/* Name of the models PVC (created or existing). */}}
{{- define "kandinsky.modelsClaimName" -}}
{{- $pvc := .Values.models.volume.persistentVolumeClaim }}
{{- if $pvc.existingClaim }}
{{- $pvc.existingClaim }}
{{- else }}
{{- printf "%s-models" (include "kandinsky.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{/* The models volume source (without name). */}}
{{- define "kandinsky.modelsVolumeSource" -}}
{{- $v := .Values.models.volume }}
{{- if eq $v.type "persistentVolumeClaim" }}
persistentVolumeClaim:
  claimName: {{ include "kandinsky.modelsClaimName" . }}
  readOnly: true
{{- else if eq $v.type "hostPath" }}
hostPath:
  path: {{ $v.hostPath.path }}
  type: {{ $v.hostPath.type }}
{{- else if eq $v.type "custom" }}
{{- if not $v.custom }}
{{- fail "models.volume.type is custom but models.volume.custom is empty: give a pod volume source, e.g. {nfs: {server: ..., path: ...}}" }}
{{- end }}
{{- toYaml $v.custom }}
{{- end }}
{{- end }}

{{/* Call with (list $ "prior"): --model-dir of a model stage. */}}
{{- define "kandinsky.modelDir" -}}
{{- $root := index . 0 }}
{{- $key := index . 1 }}
{{- $s := get $root.Values $key }}
{{- $meta := get (include "kandinsky.stageMeta" $root | fromYaml) $key }}
{{- if $s.modelDir }}
{{- $s.modelDir }}
{{- else if eq $meta.model "prior" }}
{{- printf "%s/%s" (trimSuffix "/" $root.Values.models.mountPath) $root.Values.models.priorDir }}
{{- else }}
{{- printf "%s/%s" (trimSuffix "/" $root.Values.models.mountPath) $root.Values.models.decoderDir }}
{{- end }}
{{- end }}

{{/* Call with (list $ "prior"): the URL the gateway uses for a stage. */}}
{{- define "kandinsky.stageUrl" -}}
{{- $root := index . 0 }}
{{- $key := index . 1 }}
{{- $override := get $root.Values.gateway.stageUrls $key }}
{{- if $override }}
{{- $override }}
{{- else }}
{{- printf "http://%s:%v" (include "kandinsky.stageFullname" .) $root.Values.ports.grpc }}
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
