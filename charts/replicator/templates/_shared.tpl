{{/*
Multi-node checkpoints (docs/DEPLOY.md, "Multi-node checkpoints"): several instances
contribute the files of each checkpoint source, and one of them, the assembler, publishes a
set once every instance's part is in (docs/FORMAT.md section 11). The chart writes the
shared: block of every checkpoint source, with this instance's name as a ${VAR} that
replicator expands from the container's environment, which the downward API fills.
*/}}

{{/* This instance's name, as the config says it. */}}
{{- define "replicator.sharedInstance" -}}
{{- if eq .Values.mode "daemonset" -}}
${NODE_NAME}
{{- else if eq .Values.mode "statefulset" -}}
${POD_NAME}
{{- else -}}
{{ .Values.shared.instance | default "${POD_NAME}" }}
{{- end }}
{{- end }}

{{- define "replicator.validateShared" -}}
{{- $sh := .Values.shared }}
{{- $mode := .Values.mode }}
{{- if and $sh.enabled (eq $mode "standalone") }}
{{- fail "shared.enabled: a standalone daemon is one instance; use mode daemonset (one pod per node), statefulset (pods that split one shared directory) or sidecar (one per training pod)" }}
{{- end }}
{{- if and (eq $mode "statefulset") (not $sh.enabled) }}
{{- fail "mode: statefulset runs shared.instances pods that split one directory: set shared.enabled: true and shared.instances" }}
{{- end }}
{{- if and $sh.enabled (lt (int $sh.instances) 1) }}
{{- fail (printf "shared.instances: how many instances contribute each set (%s)" (get (dict "daemonset" "the number of training nodes" "statefulset" "the number of pods, which splits the directory" "sidecar" "the number of training pods") $mode)) }}
{{- end }}
{{- if and $sh.enabled (eq $mode "daemonset") (not $sh.assembler) }}
{{- fail "shared.assembler: in mode daemonset, name the node whose pod publishes the sets (kubectl get nodes); the pods of a DaemonSet are otherwise alike" }}
{{- end }}
{{- if and $sh.instance (ne $mode "sidecar") }}
{{- fail (printf "shared.instance: only for mode sidecar; in mode %s the chart sets it to %s" $mode (include "replicator.sharedInstance" .)) }}
{{- end }}
{{- if and (eq $mode "daemonset") (not (or .Values.daemonset.checkpoints.hostPath .Values.daemonset.checkpoints.volume)) }}
{{- fail "daemonset.checkpoints.hostPath: give the node-local directory the trainers write checkpoints to (e.g. /mnt/nvme/checkpoints), or daemonset.checkpoints.volume" }}
{{- end }}
{{- if and (eq $mode "statefulset") (not (or .Values.statefulset.checkpoints.claimName .Values.statefulset.checkpoints.volume)) }}
{{- fail "statefulset.checkpoints.claimName: give the ReadWriteMany claim of the shared filesystem the trainers write checkpoints to, or statefulset.checkpoints.volume" }}
{{- end }}
{{- end }}

{{/*
config.sources, each checkpoint source with the shared: block of this instance (instance:
true, the daemon's) or with none (instance: false: verify, forget, prune). Called with
(dict "ctx" <context> "instance" <bool>); YAML of the list.
*/}}
{{- define "replicator.sharedSources" -}}
{{- include "replicator.validateShared" .ctx }}
{{- $v := .ctx.Values }}
{{- $sh := $v.shared }}
{{- $out := list }}
{{- range $s := $v.config.sources }}
{{- $src := $s }}
{{- if kindIs "map" $s }}
{{- $src = deepCopy $s }}
{{- $own := deepCopy (get $src "shared" | default dict) }}
{{- $checkpoint := eq (toString (get $src "kind")) "checkpoint" }}
{{- if and $sh.enabled $checkpoint }}
{{- range $k := list "instance" "instances" "assembler" "split" }}
{{- if hasKey $own $k }}
{{- fail (printf "config.sources[%s].shared.%s: leave it out; the chart sets it from shared.* (docs/DEPLOY.md, \"Multi-node checkpoints\")" (toString $src.name) $k) }}
{{- end }}
{{- end }}
{{- if $.instance }}
{{- $_ := set $own "instance" (include "replicator.sharedInstance" $.ctx) }}
{{- $_ := set $own "instances" (int $sh.instances) }}
{{- with $sh.assembler }}
{{- $_ := set $own "assembler" . }}
{{- end }}
{{- if eq $v.mode "statefulset" }}
{{- $_ := set $own "split" true }}
{{- end }}
{{- range $k := list "deadline" "heartbeat" }}
{{- if and (get $sh $k) (not (hasKey $own $k)) }}
{{- $_ := set $own $k (get $sh $k) }}
{{- end }}
{{- end }}
{{- $_ := set $src "shared" $own }}
{{- end }}
{{- else if and $sh.enabled (has $v.mode (list "daemonset" "statefulset")) }}
{{- fail (printf "config.sources[%s]: every %s pod would replicate this %s source again; in this mode give checkpoint sources only (kind: checkpoint), and replicate the others from a standalone release" (toString $src.name) $v.mode (toString (get $src "kind" | default "dataset"))) }}
{{- end }}
{{- if not $.instance }}
{{- $_ := unset $src "shared" }}
{{- end }}
{{- end }}
{{- $out = append $out $src }}
{{- end }}
{{- toYaml $out }}
{{- end }}
