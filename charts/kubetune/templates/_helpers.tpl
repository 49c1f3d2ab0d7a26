{{/* Names */}}
{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kubetune.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kubetune.operatorName" -}}
{{- printf "%s-operator" (include "kubetune.fullname" .) }}
{{- end }}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetune.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels */}}
{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kubetune.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- end }}

{{/* Images */}}
{{- define "kubetune.operatorImage" -}}
{{- if and .Values.image.requireDigest (not .Values.image.digest) }}
{{- fail "image.requireDigest: set image.digest (sha256:<64 hex>) to pin the operator image; tags can move" }}
{{- end }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Modes */}}
{{- define "kubetune.namespaced" -}}
{{- if eq .Values.rbac.scope "namespaced" }}true{{ end }}
{{- end }}

{{- define "kubetune.peering" -}}
{{- if or .Values.peering.enabled (gt (int .Values.replicas) 1) }}true{{ end }}
{{- end }}

{{- define "kubetune.watchNamespaces" -}}
{{- if and (include "kubetune.namespaced" .) (not .Values.watchNamespaces) }}
{{- fail "rbac.scope=namespaced needs watchNamespaces (the namespaces to get a Role in and to watch)" }}
{{- end }}
{{- toJson (.Values.watchNamespaces | default list | uniq) }}
{{- end }}

{{/*
The platform defaults file (render.PlatformDefaults, camelCase): the non-empty values, with the
trainer image defaulting to ghcr.io/kubetune/trainer:<appVersion> (render.DEFAULT_IMAGE).
*/}}
{{- define "kubetune.defaultsYaml" -}}
{{- $out := dict }}
{{- range $key, $value := .Values.defaults }}
{{- if or (kindIs "bool" $value) (kindIs "float64" $value) (kindIs "int64" $value) (kindIs "int" $value) $value }}
{{- $_ := set $out $key $value }}
{{- end }}
{{- end }}
{{- if not (get $out "image") }}
{{- $_ := set $out "image" (printf "ghcr.io/kubetune/trainer:%s" .Chart.AppVersion) }}
{{- end }}
{{- $_ := set $out "policy" (include "kubetune.policy" . | fromJson) }}
{{- toYaml $out }}
{{- end }}

{{/*
Admission: the chart's ValidatingAdmissionPolicies (cluster-scoped objects: rbac.scope cluster only).
*/}}
{{- define "kubetune.admission" -}}
{{- if .Values.admission.enabled }}
{{- if include "kubetune.namespaced" . }}
{{- fail "admission.enabled needs rbac.scope=cluster: its ValidatingAdmissionPolicies, bindings and FineTuneJobPolicy are cluster-scoped objects (set admission.enabled=false, and keep policy.tenantSecretRefs=Forbid, with rbac.scope=namespaced)" }}
{{- end }}
{{- "true" }}
{{- end }}
{{- end }}

{{/* The operator's username (ServiceAccount) as the API server sees it. */}}
{{- define "kubetune.operatorUser" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "kubetune.serviceAccountName" .) }}
{{- end }}

{{/*
The tenant policy (policy.TenantPolicy, camelCase) as JSON: values.policy with tenantSecretRefs
defaulting to VerifiedByAdmission when the admission policies are installed, Forbid when not.
*/}}
{{- define "kubetune.policy" -}}
{{- $p := deepCopy .Values.policy }}
{{- $admission := include "kubetune.admission" . }}
{{- if not $p.tenantSecretRefs }}
{{- $_ := set $p "tenantSecretRefs" (ternary "VerifiedByAdmission" "Forbid" (eq $admission "true")) }}
{{- else if and (eq $p.tenantSecretRefs "VerifiedByAdmission") (ne $admission "true") }}
{{- fail "policy.tenantSecretRefs=VerifiedByAdmission needs admission.enabled=true: only the admission policy can check that a job's creator may read the Secrets it names" }}
{{- end }}
{{- if hasKey $p.networkPolicy "egress" }}{{ if kindIs "invalid" $p.networkPolicy.egress }}
{{- $_ := unset $p.networkPolicy "egress" }}
{{- end }}{{ end }}
{{- range $index, $path := $p.dataPaths }}
{{- if or (not (hasPrefix "/" $path)) (regexMatch "^/+$" $path) }}
{{- fail (printf "policy.dataPaths[%d] %q: must be an absolute directory of a platform data volume, not /" $index $path) }}
{{- end }}
{{- range $forbidden := include "kubetune.forbiddenPathPrefixes" $ | fromJsonArray }}
{{- if or (eq (trimSuffix "/" $path) $forbidden) (hasPrefix (printf "%s/" $forbidden) $path) }}
{{- fail (printf "policy.dataPaths[%d] %q: under %s, never data" $index $path $forbidden) }}
{{- end }}
{{- end }}
{{- end }}
{{- if $p.requireImageDigest }}
{{- $image := .Values.defaults.image | default (printf "ghcr.io/kubetune/trainer:%s" .Chart.AppVersion) }}
{{- if not (regexMatch "@sha256:[0-9a-f]{64}$" $image) }}
{{- fail (printf "policy.requireImageDigest: the platform's trainer image %q is not pinned by digest; set defaults.image to name@sha256:<64 hex>" $image) }}
{{- end }}
{{- end }}
{{- toJson $p }}
{{- end }}

{{/*
The FineTuneJobPolicy's spec (the admission policy's parameters): the policy, with
allowedOutputPrefixes extended by <defaults.outputUriPrefix>/{namespace}/ (policy.output_prefixes).
*/}}
{{- define "kubetune.policyParams" -}}
{{- $p := include "kubetune.policy" . | fromJson }}
{{- with .Values.defaults.outputUriPrefix }}
{{- $_ := set $p "allowedOutputPrefixes" (append ($p.allowedOutputPrefixes | default list) (printf "%s/{namespace}/" (trimSuffix "/" .))) }}
{{- end }}
{{- toJson $p }}
{{- end }}

{{/* policy.FORBIDDEN_PATH_PREFIXES (tests/test_admission.py compares them) */}}
{{- define "kubetune.forbiddenPathPrefixes" -}}
["/proc", "/sys", "/dev", "/var/run", "/run", "/etc", "/root", "/home", "/boot", "/opt/venv", "/usr", "/bin", "/sbin", "/lib", "/lib64", "/cache", "/tmp"]
{{- end }}

{{/*
RBAC: exactly handlers.OPERATOR_RBAC_RULES (tests/test_chart.py compares them). The namespaced
rules are every rule on a namespaced resource; the cluster rules add namespaces, CRDs and
clusterkopfpeerings, which only the cluster-wide mode needs.
*/}}
{{- define "kubetune.rules.cluster" -}}
- apiGroups: [kubetune.io]
  resources: [finetunejobs]
  verbs: [get, list, watch, patch, delete]
- apiGroups: [kubetune.io]
  resources: [finetunejobs/status]
  verbs: [get, patch]
- apiGroups: [kubetune.io]
  resources: [finetunejobs/finalizers]
  verbs: [update]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, patch]
- apiGroups: [""]
  resources: [services, serviceaccounts]
  verbs: [get, create]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, create]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, create]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create]
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [get, list, watch]
- apiGroups: [kopf.dev]
  resources: [kopfpeerings, clusterkopfpeerings]
  verbs: [get, list, watch, patch]
- apiGroups: [scheduling.x-k8s.io, scheduling.volcano.sh]
  resources: [podgroups]
  verbs: [get, create]
{{- end }}

{{- define "kubetune.rules.namespaced" -}}
- apiGroups: [kubetune.io]
  resources: [finetunejobs]
  verbs: [get, list, watch, patch, delete]
- apiGroups: [kubetune.io]
  resources: [finetunejobs/status]
  verbs: [get, patch]
- apiGroups: [kubetune.io]
  resources: [finetunejobs/finalizers]
  verbs: [update]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, patch]
- apiGroups: [""]
  resources: [services, serviceaccounts]
  verbs: [get, create]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, create]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, create]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create]
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [get, list, watch, patch]
- apiGroups: [scheduling.x-k8s.io, scheduling.volcano.sh]
  resources: [podgroups]
  verbs: [get, create]
{{- end }}

{{/*
CEL: the local source (model, dataset, CA bundle path) given as a CEL string expression is not
readable data (policy._check_local_source): neither s3:, bundled:// nor an absolute path without
'..' under a data path and outside the forbidden prefixes.
*/}}
{{- define "kubetune.cel.localBad" -}}
(!{{ . }}.startsWith('s3:') && !{{ . }}.startsWith('bundled://') && ({{ . }}.matches('^[A-Za-z][A-Za-z0-9+.-]*://') || !{{ . }}.startsWith('/') || {{ . }}.matches('(^|/)[.][.](/|$)') || variables.forbiddenPaths.exists(f, {{ . }} == f || {{ . }}.startsWith(f + '/')) || !variables.dataPaths.exists(p, {{ . }} == p || {{ . }}.startsWith(p + '/'))))
{{- end }}
