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
