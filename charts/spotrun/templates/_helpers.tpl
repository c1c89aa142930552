{{/*
Names, labels, the image reference and the operator's RBAC rules, shared by the templates.
*/}}

{{- define "spotrun.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's objects are named after the release, with the chart's name unless the
release name already carries it. Cluster-scoped objects add a suffix, so 50 characters. */}}
{{- define "spotrun.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "spotrun.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spotrun.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "spotrun.labels" -}}
{{ include "spotrun.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: spotrun
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "spotrun.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "spotrun.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false: name the existing ServiceAccount the operator runs as" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository@sha256:... when a digest is given (the tag is then ignored), else repository:tag. */}}
{{- define "spotrun.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
What the operator does in the namespaces it serves, call by call (docs/install.md, "RBAC",
lists the code behind each rule; tests/unit/test_chart_rbac.py checks it against the code):
- TrainJobs: kopf lists and watches them and patches its finalizer (the reconcile daemon);
  the loop reads one (get), writes its status (patch trainjobs/status) and deletes it after
  ttlSecondsAfterFinished.
- trainjobs/finalizers update: children are created with ownerReferences that set
  blockOwnerDeletion (kopf.adopt); clusters running the OwnerReferencesPermissionEnforcement
  admission plugin require this right on the owner for that.
- trainjobs/status patch is also what the per-job runtime Role grants; RBAC lets nobody grant a
  right they do not hold, so the operator must hold it to create that Role and its binding.
- StatefulSets: watched through kopf's index, created and patched (template, replicas);
  deleted only by the garbage collector through their owner reference.
- Pods: watched through kopf's index; deleted (with a UID precondition) to restart a group.
- Services, ServiceAccounts, Roles, RoleBindings: the job's children, created, or patched when
  they exist already.
- Events: created by kopf.event on a job's transitions.
*/}}
{{- define "spotrun.jobRules" -}}
- apiGroups: ["spotrun.dev"]
  resources: ["trainjobs"]
  verbs: ["get", "list", "watch", "patch", "delete"]
- apiGroups: ["spotrun.dev"]
  resources: ["trainjobs/status"]
  verbs: ["patch"]
- apiGroups: ["spotrun.dev"]
  resources: ["trainjobs/finalizers"]
  verbs: ["update"]
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "delete", "patch"]
- apiGroups: [""]
  resources: ["services", "serviceaccounts"]
  verbs: ["create", "patch"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["create", "patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}

{{/*
What the operator reads cluster-wide, whatever namespaces it serves:
- Nodes: kopf's node index and node events (a deleted, NotReady or unreachable node is a
  preemption of its pods).
- CustomResourceDefinitions: kopf watches them to notice the TrainJob CRD changing.
- Namespaces (only with watchNamespaces): kopf lists and watches them to follow the served
  namespaces appearing and disappearing; cluster-wide it does not.
*/}}
{{- define "spotrun.clusterRules" -}}
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["list", "watch"]
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if .Values.watchNamespaces }}
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- end -}}
