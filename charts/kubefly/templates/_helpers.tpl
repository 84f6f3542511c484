{{- define "kubefly.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kubefly.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kubefly.serviceAccountName" -}}
{{- default (include "kubefly.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "kubefly.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "kubefly.objectStore.name" -}}
{{- printf "%s-objectstore" (include "kubefly.fullname" .) -}}
{{- end -}}

{{- define "kubefly.objectStore.image" -}}
{{- default (printf "kubefly-objectstore:%s" .Chart.AppVersion) .Values.objectStore.bundled.image -}}
{{- end -}}

{{- /* The S3 URL Volume snapshots go to: the bundled store's Service, else objectStore.endpoint (may be empty: none). */ -}}
{{- define "kubefly.objectStore.endpoint" -}}
{{- if .Values.objectStore.bundled.enabled -}}
{{- printf "http://%s.%s.svc:8333" (include "kubefly.objectStore.name" .) .Release.Namespace -}}
{{- else -}}
{{- .Values.objectStore.endpoint -}}
{{- end -}}
{{- end -}}

{{- /* The bundled store over TLS, for pgBackRest (2.45 speaks S3 only over HTTPS). */ -}}
{{- define "kubefly.objectStore.httpsEndpoint" -}}
{{- printf "https://%s.%s.svc:8443" (include "kubefly.objectStore.name" .) .Release.Namespace -}}
{{- end -}}

{{- /* The Secret with the store's keys: the one the operator makes for the bundled store, else the user's. */ -}}
{{- define "kubefly.objectStore.secret" -}}
{{- .Values.objectStore.bundled.enabled | ternary "kubefly-objectstore-credentials" .Values.objectStore.credentialsSecret -}}
{{- end -}}
