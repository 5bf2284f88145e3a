{{/* Names ------------------------------------------------------------------------------- */}}

{{- define "gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gateway.fullname" -}}
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

{{- define "gateway.redisName" -}}
{{- printf "%s-redis" (include "gateway.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels ------------------------------------------------------------------------------ */}}

{{- define "gateway.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gateway
{{- end }}

{{/* The gateway pods (the component keeps the dev Redis pods out of every gateway selector). */}}
{{- define "gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "gateway.labels" -}}
{{ include "gateway.commonLabels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{/* The in-chart Redis pods: "dev-redis" for the dev mode, "redis" for standalone and sentinel. */}}
{{- define "gateway.redisComponent" -}}
{{- ternary "dev-redis" "redis" (eq (toString .Values.redis.mode) "dev") }}
{{- end }}

{{- define "gateway.redisSelectorLabels" -}}
app.kubernetes.io/name: {{ include "gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: {{ include "gateway.redisComponent" . }}
{{- end }}

{{- define "gateway.redisLabels" -}}
{{ include "gateway.commonLabels" . }}
app.kubernetes.io/component: {{ include "gateway.redisComponent" . }}
{{- end }}

{{/* Images ------------------------------------------------------------------------------ */}}

{{- define "gateway.imageRef" -}}
{{- $tag := toString (default .tagDefault .image.tag) }}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{- define "gateway.image" -}}
{{- include "gateway.imageRef" (dict "image" .Values.image "tagDefault" .Chart.AppVersion) }}
{{- end }}

{{- define "gateway.redisImage" -}}
{{- include "gateway.imageRef" (dict "image" .Values.redis.image "tagDefault" "7.4-alpine") }}
{{- end }}

{{/* Durations ---------------------------------------------------------------------------
A humantime duration made of ms/s/m/h parts ("40s", "1m30s", "500ms") in milliseconds, or ""
for anything else (then the timing checks that need it are skipped). */}}
{{- define "gateway.durationMs" -}}
{{- $d := toString . | nospace }}
{{- if regexMatch "^([0-9]+(ms|s|m|h))+$" $d }}
{{- $total := 0 }}
{{- range regexFindAll "[0-9]+(ms|s|m|h)" $d -1 }}
{{- $unit := regexFind "(ms|s|m|h)$" . }}
{{- $n := trimSuffix $unit . | int64 }}
{{- $mult := get (dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000) $unit }}
{{- $total = add $total (mul $n $mult) }}
{{- end }}
{{- $total }}
{{- end }}
{{- end }}

{{/* Fails the render when the shutdown sequence cannot fit (see terminationGracePeriodSeconds
in values.yaml). Keys left at the gateway's defaults are not checked. */}}
{{- define "gateway.checkTiming" -}}
{{- $server := default dict .Values.config.server }}
{{- $drain := default dict .Values.config.drain }}
{{- $shutdown := include "gateway.durationMs" (default "" $server.shutdown_timeout) }}
{{- $delay := include "gateway.durationMs" (default "" $drain.delay) }}
{{- $window := include "gateway.durationMs" (default "" $drain.window) }}
{{- if and $shutdown $delay $window }}
{{- if le (int64 $shutdown) (add (int64 $delay) (int64 $window)) }}
{{- fail (printf "config.server.shutdown_timeout (%s) must exceed config.drain.delay + config.drain.window (%s + %s): the gateway would refuse to start" $server.shutdown_timeout $drain.delay $drain.window) }}
{{- end }}
{{- end }}
{{- if $shutdown }}
{{- $budget := add (int64 $shutdown) (mul (int64 .Values.lifecycle.preStopSleepSeconds) 1000) }}
{{- if le (mul (int64 .Values.terminationGracePeriodSeconds) 1000) $budget }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed lifecycle.preStopSleepSeconds (%d) + config.server.shutdown_timeout (%s), or the kubelet kills draining nodes" (int64 .Values.terminationGracePeriodSeconds) (int64 .Values.lifecycle.preStopSleepSeconds) $server.shutdown_timeout) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Redis --------------------------------------------------------------------------------
How the gateway reaches Redis: the in-chart "dev", "standalone" or "sentinel" (redis.mode), or an
external "secretUrl", "secretPassword", "plain", or "none". */}}
{{- define "gateway.redisMode" -}}
{{- $r := .Values.externalRedis }}
{{- $external := or $r.url $r.host $r.clusterNodes $r.existingSecret }}
{{- if and .Values.redis.enabled $external }}
{{- fail "redis.enabled (the DEV Redis) and externalRedis.* are exclusive: set redis.enabled=false to use externalRedis" }}
{{- end }}
{{- if and $r.url (or $r.host $r.clusterNodes) }}
{{- fail "externalRedis: set one of url, host or clusterNodes" }}
{{- end }}
{{- if and $r.host $r.clusterNodes }}
{{- fail "externalRedis: host and clusterNodes are exclusive" }}
{{- end }}
{{- if .Values.redis.enabled }}
{{- if not (has (toString .Values.redis.mode) (list "dev" "standalone" "sentinel")) }}
{{- fail (printf "redis.mode %q: choose dev, standalone or sentinel" (toString .Values.redis.mode)) }}
{{- end }}
{{- .Values.redis.mode }}
{{- else if $r.existingSecret }}
{{- if and $r.existingSecretUrlKey $r.existingSecretPasswordKey }}
{{- fail "externalRedis: existingSecretUrlKey and existingSecretPasswordKey are exclusive" }}
{{- else if $r.existingSecretUrlKey }}
{{- if or $r.url $r.host $r.clusterNodes }}
{{- fail "externalRedis.existingSecretUrlKey holds the whole URL: leave url, host and clusterNodes empty" }}
{{- end }}secretUrl
{{- else if $r.existingSecretPasswordKey }}
{{- if not (or $r.host $r.clusterNodes) }}
{{- fail "externalRedis.existingSecretPasswordKey needs externalRedis.host or externalRedis.clusterNodes" }}
{{- end }}
{{- if $r.url }}
{{- fail "externalRedis.existingSecretPasswordKey builds the URL from host/clusterNodes: leave url empty" }}
{{- end }}secretPassword
{{- else }}
{{- fail "externalRedis.existingSecret needs existingSecretUrlKey or existingSecretPasswordKey" }}
{{- end }}
{{- else if $external }}plain
{{- else }}none
{{- end }}
{{- end }}

{{/* The in-chart Redis' password Secret (standalone, sentinel): the given one or the generated one. */}}
{{- define "gateway.redisSecretName" -}}
{{- default (printf "%s-auth" (include "gateway.redisName" .)) .Values.redis.auth.existingSecret }}
{{- end }}

{{- define "gateway.redisHeadless" -}}
{{- printf "%s-headless" (include "gateway.redisName" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The stable DNS name of pod I of the in-chart Redis StatefulSet. */}}
{{- define "gateway.redisPodHost" -}}
{{- printf "%s-%d.%s.%s.svc.%s" (include "gateway.redisName" .root) (int .index) (include "gateway.redisHeadless" .root) .root.Release.Namespace .root.Values.clusterDomain }}
{{- end }}

{{/* Every Sentinel of the in-chart Sentinel set, "host:26379" each, space-separated. */}}
{{- define "gateway.sentinelHosts" -}}
{{- $hosts := list }}
{{- range $i := until (int .Values.redis.sentinel.replicas) }}
{{- $hosts = append $hosts (printf "%s:26379" (include "gateway.redisPodHost" (dict "root" $ "index" $i))) }}
{{- end }}
{{- join " " $hosts }}
{{- end }}

{{/* The API keys Secret: the given one, or the one the chart generates (none with apiOpen). */}}
{{- define "gateway.apiKeysSecretName" -}}
{{- if .Values.auth.apiKeys.existingSecret }}{{ .Values.auth.apiKeys.existingSecret }}
{{- else if and (not .Values.auth.apiOpen) .Values.auth.apiKeys.generate }}
{{- printf "%s-api-keys" (include "gateway.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* A random secret value (base64), or the one an existing Secret already holds: `helm upgrade`
keeps generated secrets (lookup reads the live object; `helm template` has none and generates). */}}
{{- define "gateway.keptSecretValue" -}}
{{- $existing := lookup "v1" "Secret" .namespace .name }}
{{- if and $existing $existing.data (hasKey $existing.data .key) }}
{{- index $existing.data .key }}
{{- else }}
{{- randAlphaNum 40 | b64enc }}
{{- end }}
{{- end }}

{{- define "gateway.redisScheme" -}}
{{- ternary "rediss" "redis" (.Values.externalRedis.tls | default false) }}
{{- end }}

{{/* gateway.toml ------------------------------------------------------------------------ */}}

{{- define "gateway.tomlValue" -}}
{{- if kindIs "string" . }}{{ toJson . }}
{{- else if kindIs "bool" . }}{{ . }}
{{- else if or (kindIs "float64" .) (kindIs "int" .) (kindIs "int64" .) }}
{{- if eq (float64 .) (floor .) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else if kindIs "slice" . }}[{{ range $i, $e := . }}{{ if $i }}, {{ end }}{{ include "gateway.tomlValue" $e }}{{ end }}]
{{- else if kindIs "map" . }}{{ $m := . }}{ {{- range $i, $k := keys $m | sortAlpha }}{{ if $i }},{{ end }} {{ toJson $k }} = {{ include "gateway.tomlValue" (get $m $k) }}{{ end }} }
{{- else }}{{ fail (printf "config: cannot write %v (%s) to TOML" . (kindOf .)) }}
{{- end }}
{{- end }}

{{/* The configuration: values' config plus what the chart decides (listen, Redis target). */}}
{{- define "gateway.configDict" -}}
{{- $cfg := deepCopy (default dict .Values.config) }}
{{- $server := default dict (get $cfg "server") }}
{{- $_ := set $server "listen" "0.0.0.0:8080" }}
{{- $_ := set $cfg "server" $server }}
{{- $redis := default dict (get $cfg "redis") }}
{{- $mode := include "gateway.redisMode" . }}
{{- $r := .Values.externalRedis }}
{{- if eq $mode "dev" }}
{{- $_ := set $redis "url" (printf "redis://%s:6379" (include "gateway.redisName" .)) }}
{{- else if eq $mode "sentinel" }}
{{- /* The sentinel addresses carry the password: env GATEWAY__REDIS__SENTINEL_NODES. */}}
{{- $_ := set $redis "sentinel_master" .Values.redis.sentinel.masterName }}
{{- if not (hasKey $redis "min_replicas_acked") }}
{{- $_ := set $redis "min_replicas_acked" (int64 .Values.redis.sentinel.minReplicasAcked) }}
{{- end }}
{{- else if eq $mode "plain" }}
{{- if $r.url }}
{{- $_ := set $redis "url" $r.url }}
{{- else if $r.host }}
{{- $_ := set $redis "url" (printf "%s://%s:%d" (include "gateway.redisScheme" .) $r.host (int64 $r.port)) }}
{{- else }}
{{- $_ := set $redis "cluster_nodes" $r.clusterNodes }}
{{- end }}
{{- end }}
{{- $_ := set $cfg "redis" $redis }}
{{- /* Secure by default: the API listens beyond loopback, so it needs keys or an explicit open. */}}
{{- if .Values.auth.apiOpen }}
{{- if and .Values.ingress.enabled (not .Values.auth.apiKeys.existingSecret) }}
{{- fail "auth: auth.apiOpen=true with ingress.enabled=true would publish an open API (/api/publish, /api/history) through the Ingress: give the API keys instead (auth.apiKeys; callers send Authorization: apikey <key>)" }}
{{- end }}
{{- $auth := default dict (get $cfg "auth") }}
{{- $_ := set $auth "api_open" true }}
{{- $_ := set $cfg "auth" $auth }}
{{- else if not (include "gateway.apiKeysSecretName" .) }}
{{- fail "auth: the gateway's API (/api/publish) listens on 0.0.0.0 and needs keys: keep auth.apiKeys.generate=true (the chart creates them), set auth.apiKeys.existingSecret (a Secret with comma-separated API keys), or auth.apiOpen=true to serve it without a key" }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{- define "gateway.toml" -}}
# gateway.toml, rendered by the {{ .Chart.Name }} chart from .Values.config (see values.yaml).
{{- $cfg := include "gateway.configDict" . | fromYaml }}
{{- range $section := keys $cfg | sortAlpha }}
{{- $table := get $cfg $section }}
{{- if $table }}

[{{ $section }}]
{{- range $key := keys $table | sortAlpha }}
{{- $v := get $table $key }}
{{- if not (kindIs "invalid" $v) }}
{{ $key }} = {{ include "gateway.tomlValue" $v }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Redis ports for the NetworkPolicy: networkPolicy.redisPorts plus what the chart can read. */}}
{{- define "gateway.redisPorts" -}}
{{- $ports := list }}
{{- range .Values.networkPolicy.redisPorts }}{{ $ports = append $ports (int64 .) }}{{ end }}
{{- $r := .Values.externalRedis }}
{{- if $r.host }}{{ $ports = append $ports (int64 $r.port) }}{{ end }}
{{- range $r.clusterNodes }}
{{- $p := regexFind "[0-9]+$" (trimSuffix "/" .) }}
{{- if $p }}{{ $ports = append $ports (int64 $p) }}{{ end }}
{{- end }}
{{- if $r.url }}
{{- $p := regexFind ":[0-9]+" (regexReplaceAll "^[a-z]+://([^@/]*@)?" $r.url "") }}
{{- if $p }}{{ $ports = append $ports (int64 (trimPrefix ":" $p)) }}{{ else }}{{ $ports = append $ports 6379 }}{{ end }}
{{- end }}
{{- toJson (uniq $ports) }}
{{- end }}
