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

{{/* BACKUP_MODE_LIMIT, checked as the controller checks it at start, so a bad value fails the
install instead of a controller that will not start. */}}
{{- define "pg-reflinker.backupModeLimit" -}}
{{- $limit := .Values.controller.backupModeLimit | float64 }}
{{- if or (le $limit 0.0) (gt $limit 240.0) }}
{{- fail (printf "controller.backupModeLimit=%v: expected seconds greater than 0 and at most 240 (within the sidecars' 300 s timeout)" .Values.controller.backupModeLimit) }}
{{- end }}
{{- .Values.controller.backupModeLimit }}
{{- end }}

{{/* PG_STATEMENT_TIMEOUT: backupModeLimit when empty; never longer than it. */}}
{{- define "pg-reflinker.statementTimeout" -}}
{{- $limit := .Values.controller.backupModeLimit | float64 }}
{{- with .Values.controller.pgStatementTimeout }}
{{- if or (le (float64 .) 0.0) (gt (float64 .) $limit) }}
{{- fail (printf "controller.pgStatementTimeout=%v: expected seconds greater than 0 and at most controller.backupModeLimit (%v), which bounds every statement of a copy" . $limit) }}
{{- end }}
{{- . }}
{{- else }}
{{- .Values.controller.backupModeLimit }}
{{- end }}
{{- end }}

{{/* CERT_MIRRORS: <namespace>/<cluster>:<to>, comma-separated. */}}
{{- define "pg-reflinker.certMirrors" -}}
{{- $entries := list -}}
{{- range .Values.certMirrors -}}
{{- $entries = append $entries (printf "%s:%s" .cluster .to) -}}
{{- end -}}
{{- join "," $entries -}}
{{- end -}}
