{{/* Chart name, truncated to a DNS label. */}}
{{- define "kiban.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-qualified name; components append "-<component>" (kept under 63 chars). */}}
{{- define "kiban.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kiban.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "kiban.labels" -}}
helm.sh/chart: {{ include "kiban.chart" . }}
{{ include "kiban.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kiban
{{- end -}}

{{- define "kiban.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kiban.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kiban.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kiban.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding credentials: an existing one, or the chart's. */}}
{{- define "kiban.secretName" -}}
{{- default (printf "%s-secrets" (include "kiban.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "kiban.redisHost" -}}
{{- printf "%s-redis" (include "kiban.fullname" .) -}}
{{- end -}}

{{/* image reference: (dict "root" $ "image" .Values.images.ingest) */}}
{{- define "kiban.image" -}}
{{- $tag := default .root.Chart.AppVersion .root.Values.images.tag -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}

{{/* The encoder queue of a pool: "encode" for the pool named default, else "encode.<name>". */}}
{{- define "kiban.poolQueue" -}}
{{- if eq .name "default" -}}encode{{- else -}}{{ printf "encode.%s" .name }}{{- end -}}
{{- end -}}

{{/* KIBAN_ENCODE_POOLS: model=pool for every model listed by an enabled non-default pool. */}}
{{- define "kiban.encodePools" -}}
{{- $pairs := list -}}
{{- range .Values.encoder.pools -}}
{{- if and .enabled (ne .name "default") -}}
{{- $pool := .name -}}
{{- range .models -}}
{{- $pairs = append $pairs (printf "%s=%s" . $pool) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}

{{/* Secret-backed environment shared by every worker container. Keys are optional: a key the
Secret lacks leaves the variable unset (the ConfigMap value, if any, stays). */}}
{{- define "kiban.secretEnv" -}}
{{- $secret := include "kiban.secretName" . -}}
{{- $keys := .Values.secrets.keys -}}
- name: KIBAN_QDRANT_API_KEY
  valueFrom:
    secretKeyRef: {name: {{ $secret }}, key: {{ $keys.qdrantApiKey }}, optional: true}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ $secret }}, key: {{ $keys.awsAccessKeyId }}, optional: true}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ $secret }}, key: {{ $keys.awsSecretAccessKey }}, optional: true}
{{- if .Values.redis.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ $secret }}, key: {{ $keys.redisPassword }}}
- name: KIBAN_BROKER_URL
  value: "redis://:$(REDIS_PASSWORD)@{{ include "kiban.redisHost" . }}:6379/0"
{{- else }}
- name: KIBAN_BROKER_URL
  valueFrom:
    secretKeyRef: {name: {{ $secret }}, key: {{ $keys.brokerUrl }}, optional: true}
{{- end }}
{{- end -}}

{{/* Qdrant: the in-release server's name (StatefulSet and client Service). */}}
{{- define "kiban.qdrantName" -}}
{{- printf "%s-qdrant" (include "kiban.fullname" .) -}}
{{- end -}}

{{/* The Qdrant server URL every service uses: qdrant.url, the in-release server with
qdrant.deploy, or empty for Qdrant local mode. */}}
{{- define "kiban.qdrantUrl" -}}
{{- if and .Values.qdrant.deploy .Values.qdrant.url -}}
{{- fail "qdrant.url and qdrant.deploy exclude each other: an external server, or one run by the chart" -}}
{{- end -}}
{{- if .Values.qdrant.deploy -}}
{{- printf "http://%s:6333" (include "kiban.qdrantName" .) -}}
{{- else -}}
{{- .Values.qdrant.url -}}
{{- end -}}
{{- end -}}

{{/* The Redis keys holding a Celery queue's messages (a JSON list): the list named after the
queue and kombu's priority lists "<queue>\x06\x16<n>" for n = 3, 6, 9 (kombu.transport.redis:
Channel.sep = "\x06\x16", PRIORITY_STEPS = [0, 3, 6, 9], priority 0 being the plain list).
tests/deploy/test_chart_scaling.py derives the same keys from kombu itself. */}}
{{- define "kiban.queueKeys" -}}
{{- $keys := list $ -}}
{{- range list 3 6 9 -}}
{{- $keys = append $keys (printf "%s\x06\x16%d" $ .) -}}
{{- end -}}
{{- toJson $keys -}}
{{- end -}}

{{/* Where KEDA reads the queue lengths (a JSON dict: address, databaseIndex, enableTLS,
authenticate): autoscaling.keda.redis, else the bundled Redis, else broker.url. */}}
{{- define "kiban.kedaRedis" -}}
{{- $r := .Values.autoscaling.keda.redis -}}
{{- $address := "" -}}
{{- $db := "0" -}}
{{- $tls := "false" -}}
{{- if .Values.redis.enabled -}}
{{- $address = printf "%s:6379" (include "kiban.redisHost" .) -}}
{{- else -}}
{{- $u := urlParse (required "broker.url is required (or autoscaling.keda.redis.address)" .Values.broker.url) -}}
{{- $address = $u.host -}}
{{- if and $address (not (contains ":" $address)) -}}
{{- $address = printf "%s:6379" $address -}}
{{- end -}}
{{- with trimPrefix "/" $u.path -}}
{{- $db = . -}}
{{- end -}}
{{- if eq $u.scheme "rediss" -}}
{{- $tls = "true" -}}
{{- end -}}
{{- end -}}
{{- with $r.address -}}
{{- $address = . -}}
{{- end -}}
{{- if include "kiban.given" $r.databaseIndex -}}
{{- $db = toString $r.databaseIndex -}}
{{- end -}}
{{- if include "kiban.given" $r.enableTLS -}}
{{- $tls = toString $r.enableTLS -}}
{{- end -}}
{{- if not (regexMatch "^[^:/\\s]+:[0-9]+$" $address) -}}
{{- fail (printf "autoscaling.keda.redis.address must be host:port, got %q" $address) -}}
{{- end -}}
{{- $auth := $r.authenticate -}}
{{- if eq (toString $auth) "auto" -}}
{{- $auth = or .Values.redis.enabled .Values.secrets.redisPassword .Values.secrets.existingSecret -}}
{{- end -}}
{{- toJson (dict "address" $address "databaseIndex" $db "enableTLS" $tls "authenticate" (not (not $auth))) -}}
{{- end -}}

{{/* "true" when a value is given: neither null nor the empty string (0 counts as given). */}}
{{- define "kiban.given" -}}
{{- if and (not (kindIs "invalid" .)) (ne (toString .) "") -}}true{{- end -}}
{{- end -}}

{{/* The workers to deploy: one dict per Deployment with
  component, service, queues, args (more arguments), image, cfg (its values), replicas,
  recreate (strategy), env (extra variables), qdrantVolume (mounts the local-mode directory), gpu,
  grace: terminationGracePeriodSeconds (an encoder pool's is sized from the chunk time),
  scale: KEDA bounds when autoscaling.keda scales it (its Deployment then has no replicas),
  pdb: the PodDisruptionBudget's minAvailable or maxUnavailable, absent when none is rendered.
ingest, each enabled encoder pool, indexer, reporter (only with a Qdrant server), beat (only
with a nightly source), the queue exporter and the trainer. */}}
{{- define "kiban.workers" -}}
{{- $v := .Values -}}
{{- $local := not (include "kiban.qdrantUrl" .) -}}
{{- $workers := list -}}
{{- $workers = append $workers (dict "component" "ingest" "service" "ingest" "queues" (list "ingest") "image" $v.images.ingest "cfg" $v.ingest "replicas" $v.ingest.replicas "recreate" false "env" list "qdrantVolume" false "grace" $v.ingest.terminationGracePeriodSeconds) -}}
{{- range $v.encoder.pools -}}
{{- if .enabled -}}
{{- $env := list (dict "name" "KIBAN_ORT_PROVIDERS" "value" (toString .ortProviders)) (dict "name" "KIBAN_THREADS" "value" (toString .threads)) (dict "name" "KIBAN_BATCH_SIZE" "value" (toString .batchSize)) (dict "name" "KIBAN_DEVICE_LABEL" "value" (toString .deviceLabel)) -}}
{{- if .pricePerHour -}}
{{- $env = append $env (dict "name" "KIBAN_PRICE_PER_HOUR" "value" (toString .pricePerHour)) -}}
{{- end -}}
{{- $image := ternary $v.images.encoder $v.images.encoderCpu (default false .gpu) -}}
{{- /* the drain: chunk time at the pool's throughput x factor + margin, unless given */ -}}
{{- $grace := .terminationGracePeriodSeconds -}}
{{- if not (include "kiban.given" $grace) -}}
{{- $ips := float64 (default 0 .imagesPerSecond) -}}
{{- if le $ips 0.0 -}}
{{- fail (printf "encoder pool %s: give imagesPerSecond (> 0) or terminationGracePeriodSeconds" .name) -}}
{{- end -}}
{{- $grace = add (int (ceil (mulf (divf $v.config.chunkSize $ips) $v.encoder.drain.factor))) (int $v.encoder.drain.marginSeconds) -}}
{{- end -}}
{{- $workers = append $workers (dict "component" (printf "encoder-%s" .name) "service" "encoder" "queues" (list (include "kiban.poolQueue" .)) "image" $image "cfg" . "replicas" .replicas "recreate" false "env" $env "qdrantVolume" false "pool" .name "gpu" (default false .gpu) "grace" $grace) -}}
{{- end -}}
{{- end -}}
{{- $indexerReplicas := $v.indexer.replicas -}}
{{- if and $local (gt (int $v.indexer.replicas) 1) -}}
{{- fail "indexer.replicas > 1 needs a Qdrant server (qdrant.url or qdrant.deploy): Qdrant local mode allows one process per directory (a single writer)" -}}
{{- end -}}
{{- $indexerEnv := list -}}
{{- $indexerQueues := list "index" -}}
{{- $indexerGrace := $v.indexer.terminationGracePeriodSeconds -}}
{{- if $local -}}
{{- $indexerEnv = list (dict "name" "KIBAN_QDRANT_PATH" "value" $v.qdrant.localPath) -}}
{{- $indexerQueues = list "index" "report" -}}
{{- /* it evaluates batches too: give it the reporter's drain when that is longer */ -}}
{{- $indexerGrace = max (int $indexerGrace) (int $v.reporter.terminationGracePeriodSeconds) -}}
{{- end -}}
{{- $workers = append $workers (dict "component" "indexer" "service" "indexer" "queues" $indexerQueues "image" $v.images.indexer "cfg" $v.indexer "replicas" $indexerReplicas "recreate" $local "env" $indexerEnv "qdrantVolume" $local "grace" $indexerGrace) -}}
{{- if not $local -}}
{{- $workers = append $workers (dict "component" "reporter" "service" "reporter" "queues" (list "report") "image" $v.images.reporter "cfg" $v.reporter "replicas" $v.reporter.replicas "recreate" false "env" list "qdrantVolume" false "grace" $v.reporter.terminationGracePeriodSeconds) -}}
{{- end -}}
{{- if and $v.schedule.enabled $v.schedule.source -}}
{{- if not $v.schedule.models -}}
{{- fail "schedule.models is required with schedule.source (the models the nightly batch is encoded with)" -}}
{{- end -}}
{{- $workers = append $workers (dict "component" "beat" "service" "beat" "queues" list "image" $v.images.ingest "cfg" $v.beat "replicas" 1 "recreate" true "env" list "qdrantVolume" false "grace" $v.beat.terminationGracePeriodSeconds) -}}
{{- end -}}
{{- /* the queue exporter: the only source of the queue depths; runs no task */ -}}
{{- if $v.exporter.enabled -}}
{{- $workers = append $workers (dict "component" "exporter" "service" "exporter" "queues" list "args" (list "--interval" (toString $v.exporter.interval)) "image" $v.images.ingest "cfg" $v.exporter "replicas" 1 "recreate" true "env" list "qdrantVolume" false "grace" $v.exporter.terminationGracePeriodSeconds) -}}
{{- end -}}
{{- /* the trainer: on GPU nodes when trainer.gpu (see values.yaml) */ -}}
{{- if $v.trainer.enabled -}}
{{- $t := deepCopy $v.trainer -}}
{{- if $t.gpu -}}
{{- $_ := set $t "nodeSelector" (merge (dict) (default (dict) $t.nodeSelector) (default (dict) $t.gpuNodeSelector)) -}}
{{- $_ := set $t "tolerations" (concat (default (list) $t.tolerations) (default (list) $t.gpuTolerations)) -}}
{{- end -}}
{{- $workers = append $workers (dict "component" "trainer" "service" "trainer" "queues" (list "train") "image" $v.images.trainer "cfg" $t "replicas" $t.replicas "recreate" false "env" list "qdrantVolume" false "gpu" (default false $t.gpu) "grace" $t.terminationGracePeriodSeconds) -}}
{{- end -}}
{{- /* KEDA bounds and the disruption budget of each worker */ -}}
{{- $keda := $v.autoscaling.keda -}}
{{- $poolNames := list -}}
{{- range $v.encoder.pools -}}
{{- $poolNames = append $poolNames .name -}}
{{- end -}}
{{- range $name, $_ := (default (dict) $keda.pools) -}}
{{- if not (has $name $poolNames) -}}
{{- fail (printf "autoscaling.keda.pools.%s: there is no encoder pool %s (encoder.pools)" $name $name) -}}
{{- end -}}
{{- end -}}
{{- range $w := $workers -}}
{{- $scale := dict -}}
{{- if $keda.enabled -}}
{{- if eq $w.service "encoder" -}}
{{- $scale = merge (dict) (default (dict) (index (default (dict) $keda.pools) $w.pool)) $keda.encoder -}}
{{- else if has $w.component (list "ingest" "indexer" "reporter" "trainer") -}}
{{- $scale = merge (dict) (default (dict) (index $keda $w.component)) -}}
{{- end -}}
{{- end -}}
{{- if and $scale $scale.enabled -}}
{{- if and (eq $w.component "indexer") $local -}}
{{- fail "autoscaling.keda.indexer needs a Qdrant server (qdrant.url or qdrant.deploy): in Qdrant local mode the indexer is the single writer" -}}
{{- end -}}
{{- $min := int $scale.minReplicaCount -}}
{{- $max := int $scale.maxReplicaCount -}}
{{- if or (lt $min 0) (lt $max 1) (gt $min $max) -}}
{{- fail (printf "autoscaling.keda for %s: need 0 <= minReplicaCount <= maxReplicaCount and maxReplicaCount >= 1 (got %d..%d)" $w.component $min $max) -}}
{{- end -}}
{{- if le (float64 (default 0 $scale.listLength)) 0.0 -}}
{{- fail (printf "autoscaling.keda for %s: listLength (queued tasks per replica) must be > 0" $w.component) -}}
{{- end -}}
{{- $_ := set $w "scale" (dict "minReplicaCount" $min "maxReplicaCount" $max "listLength" (toString $scale.listLength) "activationListLength" (toString (default 0 $scale.activationListLength))) -}}
{{- end -}}
{{- $pdb := include "kiban.pdb" (dict "root" $ "override" $w.cfg.podDisruptionBudget "name" $w.component "replicas" (ternary (dig "maxReplicaCount" 0 (default (dict) $w.scale)) $w.replicas (not (not $w.scale))) "scaled" (not (not $w.scale))) | fromJson -}}
{{- if $pdb -}}
{{- $_ := set $w "pdb" $pdb -}}
{{- end -}}
{{- end -}}
{{- toJson (dict "items" $workers) -}}
{{- end -}}

{{/* A PodDisruptionBudget's bound, as JSON: {"minAvailable": X} or {"maxUnavailable": Y}, or {}
when none is rendered (disabled, or 0 replicas without KEDA). podDisruptionBudget in values,
overridden by the workload's own `podDisruptionBudget` (its minAvailable/maxUnavailable pair
replaces the global pair). Args: dict "root" $ "override" VALUES "name" NAME "replicas" N (with
KEDA: its maxReplicaCount) "scaled" BOOL (KEDA owns the replica count). */}}
{{- define "kiban.pdb" -}}
{{- $g := .root.Values.podDisruptionBudget -}}
{{- $o := default (dict) .override -}}
{{- $enabled := $g.enabled -}}
{{- if hasKey $o "enabled" -}}
{{- $enabled = $o.enabled -}}
{{- end -}}
{{- $src := $g -}}
{{- if or (include "kiban.given" $o.minAvailable) (include "kiban.given" $o.maxUnavailable) -}}
{{- $src = $o -}}
{{- end -}}
{{- $bound := dict -}}
{{- if and (include "kiban.given" $src.minAvailable) (include "kiban.given" $src.maxUnavailable) -}}
{{- fail (printf "podDisruptionBudget of %s: give minAvailable or maxUnavailable, not both" .name) -}}
{{- else if include "kiban.given" $src.minAvailable -}}
{{- $bound = dict "minAvailable" $src.minAvailable -}}
{{- else if include "kiban.given" $src.maxUnavailable -}}
{{- $bound = dict "maxUnavailable" $src.maxUnavailable -}}
{{- else -}}
{{- $bound = dict "maxUnavailable" 1 -}}
{{- end -}}
{{- if and $enabled (or .scaled (gt (int .replicas) 0)) -}}
{{- if and (hasKey $bound "minAvailable") (not (kindIs "string" $bound.minAvailable)) (gt (int $bound.minAvailable) 0) (ge (int $bound.minAvailable) (int .replicas)) -}}
{{- fail (printf "podDisruptionBudget of %s: minAvailable %v >= %s %v, so a node drain could never evict its pods (use maxUnavailable)" .name $bound.minAvailable (ternary "maxReplicaCount" "replicas" .scaled) .replicas) -}}
{{- end -}}
{{- toJson $bound -}}
{{- else -}}
{{- toJson dict -}}
{{- end -}}
{{- end -}}
