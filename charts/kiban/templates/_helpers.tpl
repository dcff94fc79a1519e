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

{{/* The workers to deploy: one dict per Deployment (component, service, queues, image,
values, strategy, extra env, whether it mounts the Qdrant volume). */}}
{{- define "kiban.workers" -}}
{{- $v := .Values -}}
{{- $workers := list -}}
{{- $workers = append $workers (dict "component" "ingest" "service" "ingest" "queues" (list "ingest") "image" $v.images.ingest "cfg" $v.ingest "replicas" $v.ingest.replicas "recreate" false "env" list "qdrantVolume" false) -}}
{{- range $v.encoder.pools -}}
{{- if .enabled -}}
{{- $env := list (dict "name" "KIBAN_ORT_PROVIDERS" "value" (toString .ortProviders)) (dict "name" "KIBAN_THREADS" "value" (toString .threads)) (dict "name" "KIBAN_BATCH_SIZE" "value" (toString .batchSize)) (dict "name" "KIBAN_DEVICE_LABEL" "value" (toString .deviceLabel)) -}}
{{- if .pricePerHour -}}
{{- $env = append $env (dict "name" "KIBAN_PRICE_PER_HOUR" "value" (toString .pricePerHour)) -}}
{{- end -}}
{{- $image := ternary $v.images.encoder $v.images.encoderCpu (default false .gpu) -}}
{{- $workers = append $workers (dict "component" (printf "encoder-%s" .name) "service" "encoder" "queues" (list (include "kiban.poolQueue" .)) "image" $image "cfg" . "replicas" .replicas "recreate" false "env" $env "qdrantVolume" false "pool" .name "gpu" (default false .gpu)) -}}
{{- end -}}
{{- end -}}
{{- $local := not $v.qdrant.url -}}
{{- $indexerReplicas := $v.indexer.replicas -}}
{{- if and $local (gt (int $v.indexer.replicas) 1) -}}
{{- fail "indexer.replicas > 1 needs qdrant.url: Qdrant local mode allows one process per directory (a single writer)" -}}
{{- end -}}
{{- $indexerEnv := list -}}
{{- $indexerQueues := list "index" -}}
{{- if $local -}}
{{- $indexerEnv = list (dict "name" "KIBAN_QDRANT_PATH" "value" $v.qdrant.localPath) -}}
{{- $indexerQueues = list "index" "report" -}}
{{- end -}}
{{- $workers = append $workers (dict "component" "indexer" "service" "indexer" "queues" $indexerQueues "image" $v.images.indexer "cfg" $v.indexer "replicas" $indexerReplicas "recreate" $local "env" $indexerEnv "qdrantVolume" $local) -}}
{{- if not $local -}}
{{- $workers = append $workers (dict "component" "reporter" "service" "reporter" "queues" (list "report") "image" $v.images.reporter "cfg" $v.reporter "replicas" $v.reporter.replicas "recreate" false "env" list "qdrantVolume" false) -}}
{{- end -}}
{{- if and $v.schedule.enabled $v.schedule.source -}}
{{- if not $v.schedule.models -}}
{{- fail "schedule.models is required with schedule.source (the models the nightly batch is encoded with)" -}}
{{- end -}}
{{- $workers = append $workers (dict "component" "beat" "service" "beat" "queues" list "image" $v.images.ingest "cfg" $v.beat "replicas" 1 "recreate" true "env" list "qdrantVolume" false) -}}
{{- end -}}
{{- toJson (dict "items" $workers) -}}
{{- end -}}
