{{/* Names and labels shared by every template. */}}

{{- define "grpo-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "grpo-operator.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "grpo-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "grpo-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "grpo-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "grpo-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "grpo-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "grpo-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "grpo-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "grpo-operator.runtimeImage" -}}
{{- printf "%s:%s" .Values.runtime.image.repository (default .Chart.AppVersion .Values.runtime.image.tag) -}}
{{- end -}}

{{/*
The operator's permissions, the same rules for the ClusterRole and for each namespaced Role.
Each verb is one the operator calls (operator/grpo_operator/handlers.py, kube.py) or kopf
calls for it:
- grpojobs: kopf lists and watches them; get (reconcile reads the job); patch (kopf keeps its
  progress and diff-base in annotations and a finalizer, because timers need one); delete
  (ttlSecondsAfterFinished).
- grpojobs/status: patch (phase, conditions, ...); get as well, because the operator creates
  per-job Roles granting get+patch on it, and RBAC lets one grant only what one holds.
- grpojobs/finalizers: update, so that children may carry ownerReferences with
  blockOwnerDeletion: true where the OwnerReferencesPermissionEnforcement admission plugin is on.
- pods: kopf lists and watches them (label grpo.dev/job-name), and so does each reconcile (a
  job's pods, every attempt's); get, create, delete.
- serviceaccounts, configmaps, roles, rolebindings: get and create, one of each per job;
  services likewise, one per job of several nodes (the headless Service that gives its pods DNS
  names); all deleted with the job by the garbage collector (ownerReferences), not by the operator.
- events: create (kopf posts the job's events).
- Kueue (kueue.x-k8s.io), for jobs labelled kueue.x-k8s.io/queue-name (operator/grpo_operator/
  kueue.py): workloads get, create (one per job), list and watch (kopf, where Kueue is installed);
  workloads/status patch (release the quota after an eviction, Finished); resourceflavors get
  (cluster-scoped: the assigned flavor's node labels place the pod).
kopf runs standalone (no peering objects) with resource scanning off: no rights on
namespaces or kopfpeerings are needed. The operator's supervisor watches its own CRD (it
serves jobs only while the CRD is established), and Kueue's ResourceFlavors are read: the
clusterRules below, in a ClusterRole in both modes, since both are cluster-scoped; list and
watch name the CRD with a field selector.
*/}}
{{- define "grpo-operator.clusterRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  resourceNames: ["grpojobs.grpo.dev"]
  verbs: ["list", "watch"]
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["resourceflavors"]
  verbs: ["get"]
{{- end -}}

{{- define "grpo-operator.rules" -}}
- apiGroups: ["grpo.dev"]
  resources: ["grpojobs"]
  verbs: ["get", "list", "watch", "patch", "delete"]
- apiGroups: ["grpo.dev"]
  resources: ["grpojobs/status"]
  verbs: ["get", "patch"]
- apiGroups: ["grpo.dev"]
  resources: ["grpojobs/finalizers"]
  verbs: ["update"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["serviceaccounts", "configmaps", "services"]
  verbs: ["get", "create"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "create"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["get", "list", "watch", "create"]
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads/status"]
  verbs: ["patch"]
{{- end -}}
