{{- define "supermesh.name" -}}supermesh-controller{{- end -}}

{{- define "supermesh.labels" -}}
app.kubernetes.io/name: {{ include "supermesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "supermesh.selector" -}}
app.kubernetes.io/name: {{ include "supermesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
