{{- define "supermesh.name" -}}supermesh-controller{{- end -}}

{{- define "supermesh.labels" -}}
{{ include "supermesh.selector" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "supermesh.selector" -}}
app.kubernetes.io/name: {{ include "supermesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* An HTTP probe on the http port: (list PATH SETTINGS), SETTINGS from .Values.probes. */}}
{{- define "supermesh.probe" -}}
httpGet:
  path: {{ index . 0 }}
  port: http
{{ toYaml (index . 1) }}
{{- end -}}
