{{/* Chart name, overridable. */}}
{{- define "proxy-daemon.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects: the release name when it already contains the chart
name (release "proxy-daemon" gives "proxy-daemon"), else "<release>-<chart>".
*/}}
{{- define "proxy-daemon.fullname" -}}
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

{{- define "proxy-daemon.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the daemon's pods (never change on upgrade). */}}
{{- define "proxy-daemon.selectorLabels" -}}
app.kubernetes.io/name: {{ include "proxy-daemon.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Standard labels on every object. */}}
{{- define "proxy-daemon.labels" -}}
helm.sh/chart: {{ include "proxy-daemon.chart" . }}
{{ include "proxy-daemon.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "proxy-daemon.serviceAccountName" -}}
{{- default (include "proxy-daemon.fullname" .) .Values.serviceAccount.name }}
{{- end }}

{{- define "proxy-daemon.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Secret holding the admin port's token: adminToken.existingSecret, else the one
the chart makes (templates/admin-token.yaml). */}}
{{- define "proxy-daemon.adminTokenSecret" -}}
{{- .Values.adminToken.existingSecret | default (printf "%s-admin-token" (include "proxy-daemon.fullname" .)) }}
{{- end }}

{{/* The token's key in that Secret: `token` in the chart's own. */}}
{{- define "proxy-daemon.adminTokenKey" -}}
{{- if .Values.adminToken.existingSecret }}
{{- .Values.adminToken.existingSecretKey | default "token" }}
{{- else }}
{{- "token" }}
{{- end }}
{{- end }}
