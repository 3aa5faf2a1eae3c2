{{/* Names and labels. */}}
{{- define "tagstream.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "tagstream.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* selector labels of one component: (dict "root" $ "component" "worker") */}}
{{- define "tagstream.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "tagstream.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "tagstream.secretName" -}}
{{ .Values.secrets.existingSecret | default (printf "%s-secrets" (include "tagstream.fullname" .)) }}
{{- end -}}

{{/* "true" if the secret key is available: (dict "root" $ "key" "sasl-password") */}}
{{- define "tagstream.hasSecret" -}}
{{- if .root.Values.secrets.existingSecret -}}{{ has .key .root.Values.secrets.provided }}
{{- else -}}{{ ne (index .root.Values.secrets.values .key | default "") "" }}{{- end -}}
{{- end -}}

{{/* The secret keys a component reads, each with the setting that names its file. */}}
{{- define "tagstream.secretSettings" -}}
marketing-api-token: TAGSTREAM_ACCESS_TOKEN_FILE
sasl-password: TAGSTREAM_SASL_PASSWORD_FILE
wecom-vault-key: TAGSTREAM_WECOM_VAULT_KEY_FILE
ingest-api-token: TAGSTREAM_INGEST_API_TOKEN_FILE
{{- end -}}

{{/* env entries for the secrets of `keys` that are available: (dict "root" $ "keys" (list ...)) */}}
{{- define "tagstream.secretEnv" -}}
{{- $settings := include "tagstream.secretSettings" . | fromYaml -}}
{{- range .keys }}
{{- if eq (include "tagstream.hasSecret" (dict "root" $.root "key" .)) "true" }}
- name: {{ index $settings . }}
  value: /run/secrets/tagstream/{{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* the secret volume with the available keys of `keys` alone, or nothing */}}
{{- define "tagstream.secretVolume" -}}
{{- $items := list -}}
{{- range .keys -}}
{{- if eq (include "tagstream.hasSecret" (dict "root" $.root "key" .)) "true" -}}
{{- $items = append $items . -}}
{{- end -}}
{{- end -}}
{{- if $items }}
- name: secrets
  secret:
    secretName: {{ include "tagstream.secretName" .root }}
    defaultMode: 0400
    optional: false             # (podman 4.3 kube play dereferences it)
    items:
    {{- range $items }}
    - key: {{ . }}
      path: {{ . }}
    {{- end }}
{{- end }}
{{- end -}}

{{- define "tagstream.secretMount" -}}
{{- $any := false -}}
{{- range .keys -}}
{{- if eq (include "tagstream.hasSecret" (dict "root" $.root "key" .)) "true" -}}{{- $any = true -}}{{- end -}}
{{- end -}}
{{- if $any }}
- name: secrets
  mountPath: /run/secrets/tagstream
  readOnly: true
{{- end }}
{{- end -}}

{{/* Probes on /healthz: 503 until the event loop first beats, and once it stops beating. */}}
{{- define "tagstream.probes" -}}
startupProbe:
  httpGet: {path: /healthz, port: {{ .port }}}
  periodSeconds: 5
  failureThreshold: 60
livenessProbe:
  httpGet: {path: /healthz, port: {{ .port }}}
  periodSeconds: 10
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /healthz, port: {{ .port }}}
  periodSeconds: 10
{{- end -}}

{{- define "tagstream.podSecurity" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  fsGroup: 10001
  seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{- define "tagstream.containerSecurity" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities: {drop: [ALL]}
{{- end -}}
