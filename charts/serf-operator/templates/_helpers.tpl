{{- define "serf-operator.name" -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "serf-operator.labels" -}}
app.kubernetes.io/name: serf-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "serf-operator.selector" -}}
app.kubernetes.io/name: serf-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "serf-operator.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}{{ with .Values.image.digest }}@{{ . }}{{ end }}
{{- end -}}

{{/* The agent's RPC address: loopback of the pod (of the node with hostNetwork). */}}
{{- define "serf-operator.rpcAddr" -}}
127.0.0.1:{{ .Values.serf.rpcPort }}
{{- end -}}

{{/* The address other members reach the agent at: with serf.gossipService of type NodePort,
the node's IP and the nodePort; of type LoadBalancer, its advertiseAddr and serf.bindPort;
else serf.advertiseAddr (host, or host:port), or the pod's IP; the port is serf.bindPort
unless given. */}}
{{- define "serf-operator.advertise" -}}
{{- $g := .Values.serf.gossipService -}}
{{- $a := .Values.serf.advertiseAddr | default "$(POD_IP)" -}}
{{- if and $g.enabled (eq $g.type "NodePort") -}}
{{- $a = printf "$(HOST_IP):%v" $g.nodePort -}}
{{- else if $g.enabled -}}
{{- $a = $g.advertiseAddr -}}
{{- end -}}
{{- if regexMatch ":[0-9]+$" $a -}}
{{ $a }}
{{- else -}}
{{ $a }}:{{ .Values.serf.bindPort }}
{{- end -}}
{{- end -}}

{{/* Rules for SerfHandlers, SerfEventTriggers and what the operator creates for them. */}}
{{- define "serf-operator.rules" -}}
- apiGroups: ["serf.operator.io"]
  resources: ["serfhandlers", "serfeventtriggers"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["serf.operator.io"]
  resources: ["serfhandlers/status", "serfeventtriggers/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create", "patch", "delete"]
# A query answered with a Job's output: the Job's Pod, and its log.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
# Launch ledgers (read by one list of a handler's segments; an aged-out segment deleted)
# and triggers' watch state.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "create", "patch", "delete"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- if .Values.discovery.enabled }}
# Service discovery: SerfServices, and the Services and EndpointSlices they publish (written
# by server-side apply, which creates what is missing; deleted when a SerfService stops
# publishing them). Their ConfigMaps fall under the configmaps rule above.
- apiGroups: ["serf.operator.io"]
  resources: ["serfservices"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["serf.operator.io"]
  resources: ["serfservices/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["get", "list", "create", "patch", "delete"]
{{- end }}
{{- range .Values.watchKinds }}
# Read for SerfEventTriggers that watch it (spec.watch).
- apiGroups: [{{ .apiGroup | quote }}]
  resources: {{ toJson .resources }}
  verbs: ["get", "list", "watch"]
{{- end }}
{{- end -}}

{{/* Prefix of the operator's state objects in the release's namespace (ConfigMaps
PREFIX-membership, PREFIX-pending-launches, PREFIX-keyring; the Lease PREFIX): operator.statePrefix,
or the release's name, so that two releases in one namespace keep apart. */}}
{{- define "serf-operator.statePrefix" -}}
{{- .Values.operator.statePrefix | default (include "serf-operator.name" .) -}}
{{- end -}}
