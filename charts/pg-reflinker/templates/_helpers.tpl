{{/* pg-reflinker's image. */}}
{{- define "pg-reflinker.image" -}}
image: {{ printf "%s:%s" .Values.image.repository .Values.image.tag | quote }}
{{- with .Values.image.pullPolicy }}
imagePullPolicy: {{ . }}
{{- end }}
{{- end }}

{{/* The names of the chart's StorageClasses, comma-separated (the claim loop's STORAGE_CLASS). */}}
{{- define "pg-reflinker.storageClassNames" -}}
{{- $names := list }}
{{- range .Values.storageClasses }}{{ $names = append $names .name }}{{ end }}
{{- join "," $names }}
{{- end }}

{{/* The service account of the controller or of the node plugin, as the API server names it. */}}
{{- define "pg-reflinker.user" -}}
system:serviceaccount:{{ .Release.Namespace }}:pg-reflinker-{{ .component }}
{{- end }}

{{/* The rules a process needs to ask the API server who may read its /metrics. */}}
{{- define "pg-reflinker.metricsReviews" -}}
{{- if eq .Values.metrics.auth "kubernetes" }}
  # Who may read /metrics: the scraper's bearer token, reviewed by the API server.
  - apiGroups: [authentication.k8s.io]
    resources: [tokenreviews]
    verbs: [create]
  - apiGroups: [authorization.k8s.io]
    resources: [subjectaccessreviews]
    verbs: [create]
{{- end }}
{{- end }}
