{{/* Names and labels (app.kubernetes.io/*). */}}
{{- define "lastmile.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "lastmile.fullname" -}}
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

{{- define "lastmile.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lastmile.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "lastmile.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "lastmile.selectorLabels" . }}
app.kubernetes.io/version: {{ include "lastmile.tag" . | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/component: gateway
app.kubernetes.io/part-of: lastmile
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "lastmile.tag" -}}
{{- .Values.image.tag | default .Chart.AppVersion -}}
{{- end -}}

{{- define "lastmile.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "lastmile.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
A Kubernetes quantity ("10Gi", "500M", "1.5Ti", "1073741824") in bytes, as an integer.
*/}}
{{- define "lastmile.quantityBytes" -}}
{{- $q := toString . -}}
{{- $num := regexFind "^[0-9]+(\\.[0-9]+)?" $q -}}
{{- $suffix := trimPrefix $num $q -}}
{{- $mult := dict "" "1" "k" "1e3" "M" "1e6" "G" "1e9" "T" "1e12" "P" "1e15" "E" "1e18" "Ki" "1024" "Mi" "1048576" "Gi" "1073741824" "Ti" "1099511627776" "Pi" "1125899906842624" "Ei" "1152921504606846976" -}}
{{- if or (not $num) (not (hasKey $mult $suffix)) -}}
{{- fail (printf "spool.size: %q is not a byte quantity (e.g. 10Gi, 500M)" $q) -}}
{{- end -}}
{{- mulf (float64 $num) (float64 (get $mult $suffix)) | floor | int64 -}}
{{- end -}}

{{/*
spool.max_bytes for each worker: fixed, or floor(size * usableFraction / workers) rounded
down to a MiB. Fails when the workers' spools cannot fit in the volume.
*/}}
{{- define "lastmile.spoolMaxBytes" -}}
{{- $v := .Values -}}
{{- $size := include "lastmile.quantityBytes" $v.spool.size | int64 -}}
{{- $workers := int64 $v.workers -}}
{{- $mib := int64 1048576 -}}
{{- $each := int64 0 -}}
{{- if $v.spool.maxBytesPerWorker -}}
{{- $each = int64 $v.spool.maxBytesPerWorker -}}
{{- if gt (mul $each $workers) $size -}}
{{- fail (printf "spool.maxBytesPerWorker: %d bytes x %d workers does not fit in spool.size %s (%d bytes)" $each $workers (toString $v.spool.size) $size) -}}
{{- end -}}
{{- else -}}
{{- $each = mul (div (divf (mulf $size $v.spool.usableFraction) $workers | floor | int64) $mib) $mib -}}
{{- end -}}
{{- if lt $each (mul 16 $mib) -}}
{{- fail (printf "spool: %d bytes per worker is too small (16 MiB at least): raise spool.size (%s) or lower workers (%d)" $each (toString $v.spool.size) $workers) -}}
{{- end -}}
{{- $each -}}
{{- end -}}

{{/* Paths inside the pod. */}}
{{- define "lastmile.paths" -}}
config: /etc/lastmile/config/gateway.yaml
rules: /etc/lastmile/rules
spool: /var/lib/lastmile/spool
passwd: /etc/lastmile/auth/passwd
tls: /etc/lastmile/tls
{{- end -}}

{{/*
gateway.yaml: .Values.config with the keys the chart owns set over it (the mounts, ports
and probes depend on them). Fails when no client could ever get in, as the gateway would.
*/}}
{{- define "lastmile.configDict" -}}
{{- $v := .Values -}}
{{- $p := include "lastmile.paths" . | fromYaml -}}
{{- $tlsOn := ne $v.tls.secretName "" -}}
{{- if and $v.tls.requireClientCert (not $tlsOn) -}}
{{- fail "tls.requireClientCert needs tls.secretName (a Secret with tls.crt, tls.key and ca.crt)" -}}
{{- end -}}
{{- $tlsListener := dict "enabled" $tlsOn "host" "0.0.0.0" -}}
{{- if $tlsOn -}}
{{- $_ := set $tlsListener "certfile" (printf "%s/tls.crt" $p.tls) -}}
{{- $_ := set $tlsListener "keyfile" (printf "%s/tls.key" $p.tls) -}}
{{- if $v.tls.requireClientCert -}}
{{- $_ := set $tlsListener "cafile" (printf "%s/ca.crt" $p.tls) -}}
{{- $_ := set $tlsListener "require_client_cert" true -}}
{{- end -}}
{{- end -}}
{{- $listeners := dict
    "mqtt" (dict "host" "0.0.0.0" "port" 1883)
    "http" (dict "host" "0.0.0.0" "port" 8080)
    "mqtts" (merge (dict "port" 8883) $tlsListener)
    "https" (merge (dict "port" 8443) (deepCopy $tlsListener))
    "metrics" (dict "host" "0.0.0.0" "port" 9100) -}}
{{- $spool := dict "enabled" $v.spool.enabled -}}
{{- if $v.spool.enabled -}}
{{- $_ := set $spool "dir" $p.spool -}}
{{- $_ := set $spool "max_bytes" (include "lastmile.spoolMaxBytes" . | int64) -}}
{{- end -}}
{{- $auth := dict "allow_anonymous" $v.auth.allowAnonymous -}}
{{- if $v.auth.passwordSecret -}}
{{- $_ := set $auth "password_file" $p.passwd -}}
{{- end -}}
{{- if $v.auth.jwt.jwksUrl -}}
{{- $jwt := dict "jwks_url" $v.auth.jwt.jwksUrl -}}
{{- with $v.auth.jwt.issuer }}{{ $_ := set $jwt "issuer" . }}{{ end -}}
{{- with $v.auth.jwt.audience }}{{ $_ := set $jwt "audience" . }}{{ end -}}
{{- $_ := set $auth "jwt" $jwt -}}
{{- end -}}
{{- $owned := dict
    "workers" (int64 $v.workers)
    "listeners" $listeners
    "kafka" (dict "clusters" (dict "default" (dict "bootstrap_servers" $v.kafka.bootstrapServers)))
    "rules" (dict "dir" $p.rules "watch" true)
    "spool" $spool
    "auth" $auth
    "log" (dict "format" "json") -}}
{{- $cfg := mustMergeOverwrite (deepCopy $v.config) $owned -}}
{{- $drain := $cfg.shutdown_timeout_s | default 15 | float64 -}}
{{- if lt (float64 $v.terminationGracePeriodSeconds) (addf $drain 5) -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed config.shutdown_timeout_s (%v) by 5 s at least, or Kubernetes kills the gateway mid-drain" $v.terminationGracePeriodSeconds $drain) -}}
{{- end -}}
{{- $a := $cfg.auth -}}
{{- $mtls := and $tlsOn $v.tls.requireClientCert -}}
{{- if not (or $a.allow_anonymous $a.password_file $a.jwt $mtls) -}}
{{- fail "auth: no client could ever get in: set auth.passwordSecret, auth.jwt.jwksUrl or tls.requireClientCert (or auth.allowAnonymous: true, not for production)" -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}
