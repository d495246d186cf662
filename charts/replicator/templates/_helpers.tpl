{{/*
Names and labels. These helpers read only .Values and .Release, so that a parent chart can
call the sidecar templates below with (dict "Values" .Values.replicator "Release" .Release).
*/}}
{{- define "replicator.name" -}}
{{- default "replicator" .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "replicator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := include "replicator.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "replicator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "replicator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "replicator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "replicator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "replicator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "replicator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The prune CronJob's own account (its own cloud role: docs/DEPLOY.md). */}}
{{- define "replicator.pruneServiceAccountName" -}}
{{- $sa := .Values.prune.serviceAccount }}
{{- if $sa.create }}
{{- default (printf "%s-prune" (include "replicator.fullname" . | trunc 57 | trimSuffix "-")) $sa.name }}
{{- else }}
{{- required "prune.serviceAccount.name: with prune.serviceAccount.create: false, name the existing account prune runs as (one with the pruning role, not the daemon's)" $sa.name }}
{{- end }}
{{- end }}

{{- define "replicator.pruneName" -}}
{{- include "replicator.fullname" . | trunc 46 | trimSuffix "-" }}-prune
{{- end }}

{{/* The prune CronJob's mounts (forget and prune): config, a fresh cache, /tmp, extras. */}}
{{- define "replicator.pruneMounts" -}}
- name: replicator-config
  mountPath: /etc/replicator
  readOnly: true
- name: replicator-state
  mountPath: /var/lib/replicator
- name: replicator-tmp
  mountPath: /tmp
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "replicator.daemonsetStatePath" -}}
{{- .Values.daemonset.statePath | default (printf "/var/lib/replicator/%s-%s" .Release.Namespace (include "replicator.fullname" .)) }}
{{- end }}

{{/* The StatefulSet's name: its pods add -<ordinal>, its revisions a hash of 10 more. */}}
{{- define "replicator.statefulsetName" -}}
{{- include "replicator.fullname" . | trunc 52 | trimSuffix "-" }}
{{- end }}

{{- define "replicator.image" -}}
{{- $repo := required "image.repository is required: an image with replicator installed (build one with the repository's Dockerfile)" .Values.image.repository }}
{{- printf "%s:%s" $repo (toString .Values.image.tag) }}
{{- end }}

{{/* Cross-field checks, with messages that say what to do. */}}
{{- define "replicator.validate" -}}
{{- if not (has .Values.mode (list "standalone" "sidecar" "daemonset" "statefulset")) }}
{{- fail (printf "mode must be standalone, sidecar, daemonset or statefulset (got %q)" (toString .Values.mode)) }}
{{- end }}
{{- include "replicator.validateShared" . }}
{{- if and (has .Values.mode (list "daemonset" "statefulset")) .Values.state.persistence.existingClaim }}
{{- fail (printf "state.persistence.existingClaim: one claim cannot hold the state of every %s pod; leave it empty (daemonset: daemonset.statePath on each node; statefulset: a claim per pod from state.persistence)" .Values.mode) }}
{{- end }}
{{- if and (eq .Values.mode "sidecar") .Values.state.persistence.enabled (not .Values.state.persistence.existingClaim) }}
{{- fail "state.persistence.enabled creates one claim, which training pods cannot share: in sidecar mode use state.persistence.existingClaim, or the default emptyDir" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.service.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.service.enabled" }}
{{- end }}
{{- if and .Values.sidecar.example.enabled (ne .Values.mode "sidecar") }}
{{- fail "sidecar.example.enabled needs mode: sidecar" }}
{{- end }}
{{- if and .Values.sidecar.example.enabled (not .Values.sidecar.native) }}
{{- fail "sidecar.example.enabled needs sidecar.native: the example is a Job, and a Job with an ordinary sidecar container never completes" }}
{{- end }}
{{- if .Values.prune.enabled }}
{{- range $t := (.Values.config | default dict).targets | default list }}
{{- if and (kindIs "map" $t) (hasKey $t "prune") }}
{{- fail (printf "config.targets[%s].prune: the daemon would collect garbage itself, with the replicating role's credentials, beside the prune CronJob: remove it (prune.enabled runs replicator prune under its own service account), or set prune.enabled: false to keep the daemon's schedule (docs/DEPLOY.md, \"Pruning under its own role\")" (toString $t.name)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The replicator config file: .Values.config plus the two keys the chart owns. listen must
not be replicator's localhost default: the kubelet's probes and Prometheus connect to the
pod's IP.
*/}}
{{- define "replicator.configYaml" -}}
{{- include "replicator.configFor" (dict "ctx" . "instance" true) }}
{{- end }}

{{/*
The config of the pods that act as no instance of a shared source (verify, forget, prune):
the same, without the shared: blocks, whose instance names another pod's identity. Those
commands read the repository (parts included) and never need it.
*/}}
{{- define "replicator.maintenanceConfigYaml" -}}
{{- include "replicator.configFor" (dict "ctx" . "instance" false) }}
{{- end }}

{{/* Where the CronJobs' config is: maintenance.yaml only when it differs. */}}
{{- define "replicator.maintenanceConfigPath" -}}
{{- if ne (include "replicator.configYaml" .) (include "replicator.maintenanceConfigYaml" .) -}}
/etc/replicator/maintenance.yaml
{{- else -}}
/etc/replicator/replicator.yaml
{{- end }}
{{- end }}

{{/* Called with (dict "ctx" <context> "instance" <bool>). */}}
{{- define "replicator.configFor" -}}
{{- $instance := .instance }}
{{- with .ctx }}
{{- $cfg := deepCopy (.Values.config | default dict) }}
{{- if hasKey $cfg "listen" }}
{{- fail (printf "config.listen: leave it out; the chart sets listen: 0.0.0.0:%v so that the kubelet's probes and Prometheus reach the daemon (change the port with metrics.port)" .Values.metrics.port) }}
{{- end }}
{{- if hasKey $cfg "state_dir" }}
{{- fail "config.state_dir: leave it out; the chart mounts the state volume at /var/lib/replicator and points state_dir there (see state.*)" }}
{{- end }}
{{- if not $cfg.sources }}
{{- fail "config.sources is empty: give at least one source to replicate (README.md, Configuration)" }}
{{- end }}
{{- if not $cfg.targets }}
{{- fail "config.targets is empty: give at least one target to replicate to (README.md, Configuration)" }}
{{- end }}
{{- $_ := set $cfg "listen" (printf "0.0.0.0:%v" .Values.metrics.port) }}
{{- $_ := set $cfg "state_dir" "/var/lib/replicator" }}
{{- $_ := set $cfg "sources" (include "replicator.sharedSources" (dict "ctx" . "instance" $instance) | fromYamlArray) }}
{{- toYaml $cfg }}
{{- end }}
{{- end }}

{{/* Environment of every replicator container: credentials and ${VAR} values. */}}
{{- define "replicator.env" -}}
{{- include "replicator.envWith" (dict "ctx" . "secret" .Values.credentials.existingSecret) }}
{{- end }}

{{/* The same, for the daemon's container: with its identity from the downward API. */}}
{{- define "replicator.daemonEnv" -}}
{{- include "replicator.envWith" (dict "ctx" . "secret" .Values.credentials.existingSecret "identity" true) }}
{{- end }}

{{/*
The same, with the Secret of credentials given: (dict "ctx" <context> "secret" <name>). The
prune CronJob passes prune.credentials.existingSecret when it has keys of its own.
*/}}
{{- define "replicator.envWith" -}}
{{- $v := .ctx.Values -}}
env:
  - name: HOME  # the image's user has no home directory; botocore looks for ~/.aws
    value: /tmp
  {{- if .identity }}
  # Who this instance is (shared.instance: ${POD_NAME} or ${NODE_NAME}; docs/DEPLOY.md).
  - name: POD_NAME
    valueFrom: {fieldRef: {fieldPath: metadata.name}}
  - name: NODE_NAME
    valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
  {{- end }}
  {{- with $v.env }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- if or .secret $v.envFrom }}
envFrom:
  {{- with .secret }}
  - secretRef:
      name: {{ . }}
  {{- end }}
  {{- with $v.envFrom }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
{{- end }}

{{/*
The daemon's container. Called with (dict "ctx" <context> "sidecar" <bool>).
*/}}
{{- define "replicator.container" -}}
{{- $v := .ctx.Values }}
{{- $native := and .sidecar $v.sidecar.native }}
{{- $p := $v.probes -}}
- name: replicator
  image: {{ include "replicator.image" .ctx }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  {{- if $native }}
  restartPolicy: Always
  {{- end }}
  command: [replicator]
  args: [run, --config, /etc/replicator/replicator.yaml]
  {{- include "replicator.daemonEnv" .ctx | nindent 2 }}
  ports:
    - name: replicator
      containerPort: {{ $v.metrics.port }}
      protocol: TCP
  {{- if and $p.startup.enabled (not $native) }}
  startupProbe:
    httpGet: {path: /healthz, port: replicator}
    periodSeconds: {{ $p.startup.periodSeconds }}
    timeoutSeconds: {{ $p.startup.timeoutSeconds }}
    failureThreshold: {{ $p.startup.failureThreshold }}
  {{- end }}
  {{- if $p.liveness.enabled }}
  livenessProbe:
    httpGet: {path: /healthz, port: replicator}
    {{- if and $native $p.startup.enabled }}
    initialDelaySeconds: {{ mul $p.startup.periodSeconds $p.startup.failureThreshold }}
    {{- end }}
    periodSeconds: {{ $p.liveness.periodSeconds }}
    timeoutSeconds: {{ $p.liveness.timeoutSeconds }}
    failureThreshold: {{ $p.liveness.failureThreshold }}
  {{- end }}
  {{- if $p.readiness.enabled }}
  readinessProbe:
    httpGet: {path: /readyz, port: replicator}
    periodSeconds: {{ $p.readiness.periodSeconds }}
    timeoutSeconds: {{ $p.readiness.timeoutSeconds }}
    failureThreshold: {{ $p.readiness.failureThreshold }}
  {{- end }}
  resources:
    {{- toYaml $v.resources | nindent 4 }}
  securityContext:
    {{- toYaml $v.securityContext | nindent 4 }}
  volumeMounts:
    - name: replicator-config
      mountPath: /etc/replicator
      readOnly: true
    - name: replicator-state
      mountPath: /var/lib/replicator
    - name: replicator-tmp
      mountPath: /tmp
    {{- if .sidecar }}
    - name: {{ $v.sidecar.checkpoints.volume }}
      mountPath: {{ $v.sidecar.checkpoints.mountPath }}
      readOnly: true
    {{- else if has $v.mode (list "daemonset" "statefulset") }}
    - name: checkpoints
      mountPath: {{ (index $v $v.mode).checkpoints.mountPath }}
      readOnly: true
    {{- end }}
    {{- with $v.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/*
Volumes of a pod that runs replicator. Called with (dict "ctx" <context> "mode" <m>), m is
"daemon" (standalone), "sidecar", "daemonset", "statefulset", "verify" or "prune" (the last
two: always a fresh cache; the daemon's claim is ReadWriteOnce and its cache is locked while
it runs). A StatefulSet's state is a claim per pod (its volumeClaimTemplates).
*/}}
{{- define "replicator.volumes" -}}
{{- $v := .ctx.Values }}
{{- $pvc := $v.state.persistence -}}
- name: replicator-config
  configMap:
    name: {{ include "replicator.fullname" .ctx }}
{{- if has .mode (list "daemonset" "statefulset") }}
{{- $ck := (index $v .mode).checkpoints }}
- name: checkpoints
  {{- if $ck.volume }}
  {{- toYaml $ck.volume | nindent 2 }}
  {{- else if eq .mode "daemonset" }}
  hostPath:
    path: {{ $ck.hostPath }}
    type: Directory  # the trainers' directory: an absent one is a mistake, not something to create
  {{- else }}
  persistentVolumeClaim:
    claimName: {{ $ck.claimName }}
    readOnly: true
  {{- end }}
{{- end }}
{{- if eq .mode "daemonset" }}
- name: replicator-state
  hostPath:  # on the node: a restarted pod keeps its cache
    path: {{ include "replicator.daemonsetStatePath" .ctx }}
    type: DirectoryOrCreate
{{- else if ne .mode "statefulset" }}
- name: replicator-state
  {{- if and $pvc.existingClaim (has .mode (list "daemon" "sidecar")) }}
  persistentVolumeClaim:
    claimName: {{ $pvc.existingClaim }}
  {{- else if and $pvc.enabled (eq .mode "daemon") }}
  persistentVolumeClaim:
    claimName: {{ include "replicator.fullname" .ctx }}-state
  {{- else }}
  emptyDir:
    {{- toYaml $v.state.emptyDir | nindent 4 }}
  {{- end }}
{{- end }}
- name: replicator-tmp
  emptyDir:
    sizeLimit: {{ $v.tmp.sizeLimit }}
{{- with $v.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
For your training pod template (docs/DEPLOY.md), from a chart that depends on this one:

  metadata:
    labels:
      {{- include "replicator.sidecarPodLabels" (dict "Values" .Values.replicator "Release" .Release) | nindent 6 }}
  spec:
    initContainers:   # sidecar.native: true (Kubernetes >= 1.29); else under containers:
      {{- include "replicator.sidecarContainer" (dict "Values" .Values.replicator "Release" .Release) | nindent 6 }}
    volumes:
      - name: checkpoints   # sidecar.checkpoints.volume, shared with the trainer
        ...
      {{- include "replicator.sidecarVolumes" (dict "Values" .Values.replicator "Release" .Release) | nindent 6 }}
*/}}
{{- define "replicator.sidecarContainer" -}}
{{- include "replicator.container" (dict "ctx" . "sidecar" true) }}
{{- end }}

{{- define "replicator.sidecarVolumes" -}}
{{- include "replicator.volumes" (dict "ctx" . "mode" "sidecar") }}
{{- end }}

{{/* The label that the metrics Service selects training pods by. */}}
{{- define "replicator.sidecarPodLabels" -}}
replicator/sidecar: {{ include "replicator.fullname" . }}
{{- end }}

{{/* PromQL label matchers for this release's series. */}}
{{- define "replicator.ruleSelector" -}}
{{- default (printf "job=%q,namespace=%q" (include "replicator.fullname" .) .Release.Namespace) .Values.metrics.prometheusRule.selector }}
{{- end }}
