#!/usr/bin/env bash
# The local secured cluster: three KRaft nodes on 127.0.0.1, SASL_SSL for clients (SCRAM),
# TLS with certificates between the brokers, and ACLs. (kafka.sh runs the plain one-broker
# default; `kafka.sh cluster ...` comes here.)
#
#   start        set up once (CA and broker certificate with openssl, SCRAM users at format
#                time), start the stopped nodes, wait until all three serve, grant the ACLs
#   stop         stop the nodes (SIGTERM, then SIGKILL after 30 s)
#   reset        stop and delete everything: data, certificates, passwords
#   status       which nodes run
#   kill N       SIGKILL node N (1-3), as a crash; `start` brings it back
#   start-node N start node N and wait until it serves
#   stop-node N  stop node N gracefully (SIGTERM)
#   controller   print the node id of the active KRaft controller (the quorum leader)
#   env          print the TAGSTREAM_* settings that connect tagstream to the cluster
#   tool CLASS   run a Kafka tool class as the admin user (its --command-config is ready:
#                add `--command-config "$TAGSTREAM_CLUSTER_STATE/secrets/admin.properties"`)
#
# Clients connect to 127.0.0.1:19092,127.0.0.1:19192,127.0.0.1:19292 over SASL_SSL with
# SCRAM-SHA-512. Users: `tagstream` (ACLs: topics, groups and transactional ids whose names
# start with one of $TAGSTREAM_CLUSTER_PREFIXES, default "tagstream it- bench-"), `intruder`
# (no ACLs: refused everything) and `admin` (super user, for the tools). Their passwords are
# random, made at setup, in $state/secrets/*.password (mode 600). The CA is $state/tls/ca.pem.
#
# Environment: TAGSTREAM_CLUSTER_STATE (default <repo>/.state/cluster), KAFKA_HEAP_OPTS.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
state=${TAGSTREAM_CLUSTER_STATE:-$repo/.state/cluster}
lib=$here/lib
prefixes=${TAGSTREAM_CLUSTER_PREFIXES:-tagstream it- bench-}
# Three brokers on two cores: a small heap each leaves the page cache the rest.
heap=${KAFKA_HEAP_OPTS:--Xms256m -Xmx768m}
nodes=(1 2 3)

say() { printf 'cluster: %s\n' "$*" >&2; }
client_port() { echo $((19092 + ($1 - 1) * 100)); }
internal_port() { echo $((19094 + ($1 - 1) * 100)); }
controller_port() { echo $((19093 + ($1 - 1) * 100)); }
bootstrap() { echo "127.0.0.1:19092,127.0.0.1:19192,127.0.0.1:19292"; }
pidfile() { echo "$state/node$1/kafka.pid"; }
running() { [ -f "$(pidfile "$1")" ] && kill -0 "$(cat "$(pidfile "$1")")" 2>/dev/null; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
secret() { cat "$state/secrets/$1.password"; }

java_tool() {  # java_tool MAIN ARGS...
  java -Dlog4j2.configurationFile="$here/log4j2.yaml" -Dkafka.logs.dir="$state/logs" -cp "$lib/*" "$@"
}

make_tls() {
  [ -f "$state/tls/ca.pem" ] && return
  command -v openssl >/dev/null || { say "openssl not found: run deploy/setup-system.sh"; exit 1; }
  say "making a local CA and the broker certificate (openssl)"
  local tls=$state/tls
  mkdir -p "$tls"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=tagstream-local-ca" \
    -keyout "$tls/ca.key" -out "$tls/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=tagstream-local-broker" \
    -keyout "$tls/broker.key" -out "$tls/broker.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n' > "$tls/broker.ext"
  openssl x509 -req -in "$tls/broker.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" -CAcreateserial \
    -days 3650 -extfile "$tls/broker.ext" -out "$tls/broker.pem" 2>/dev/null
  # Kafka's PEM keystore wants an encrypted PKCS#8 key followed by the certificate chain.
  # (PBES1 with 3DES: Java's SecretKeyFactory cannot read the PBES2 that openssl uses by default)
  openssl pkcs8 -topk8 -v1 PBE-SHA1-3DES -in "$tls/broker.key" -passout "pass:$(secret broker-key)" \
    -out "$tls/broker-key.p8" 2>/dev/null
  cat "$tls/broker-key.p8" "$tls/broker.pem" > "$tls/broker-keystore.pem"
  # A client certificate for mutual TLS (docs/operations.md shows how to use it).
  openssl req -newkey rsa:2048 -nodes -subj "/CN=tagstream" \
    -keyout "$tls/client.key" -out "$tls/client.csr" 2>/dev/null
  printf 'extendedKeyUsage=clientAuth\n' > "$tls/client.ext"
  openssl x509 -req -in "$tls/client.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" -CAcreateserial \
    -days 3650 -extfile "$tls/client.ext" -out "$tls/client.pem" 2>/dev/null
  rm -f "$tls"/*.csr "$tls"/*.ext
  chmod 600 "$tls"/*.key "$tls/broker-key.p8" "$tls/broker-keystore.pem"
}

make_secrets() {
  mkdir -p "$state/secrets"
  chmod 700 "$state/secrets"
  local who
  for who in admin tagstream intruder broker-key; do
    [ -f "$state/secrets/$who.password" ] && continue
    (umask 077; openssl rand -hex 16 > "$state/secrets/$who.password")
  done
  (umask 077; cat > "$state/secrets/admin.properties" <<EOF
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$(secret admin)";
ssl.truststore.type=PEM
ssl.truststore.location=$state/tls/ca.pem
EOF
)
}

configure() {  # configure N: write node N's properties and format its storage once
  local n=$1 dir=$state/node$1
  mkdir -p "$dir/data" "$state/logs"
  sed -e "s#@NODE@#$n#g" -e "s#@STATE@#$state#g" -e "s#@KEY_PASSWORD@#$(secret broker-key)#g" \
      -e "s#@PORT_CLIENT@#$(client_port "$n")#g" -e "s#@PORT_INTERNAL@#$(internal_port "$n")#g" \
      -e "s#@PORT_CONTROLLER@#$(controller_port "$n")#g" "$here/cluster.properties" > "$dir/server.properties"
  chmod 600 "$dir/server.properties"
  if [ ! -f "$dir/data/meta.properties" ]; then
    [ -f "$state/cluster-id" ] || java_tool kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1 > "$state/cluster-id"
    local scram=() who
    for who in admin tagstream intruder; do
      scram+=(--add-scram "SCRAM-SHA-512=[name=$who,password=$(secret "$who")]")
      scram+=(--add-scram "SCRAM-SHA-256=[name=$who,password=$(secret "$who")]")
    done
    java_tool kafka.tools.StorageTool format -t "$(cat "$state/cluster-id")" -c "$dir/server.properties" \
      "${scram[@]}" >/dev/null
  fi
}

launch() {  # launch N: start node N in the background
  local n=$1 dir=$state/node$1
  # Node logs go to $state/logs/nodeN; setsid: the node outlives the shell that started it.
  mkdir -p "$state/logs/node$n"
  KAFKA_HEAP="$heap" setsid bash -c '
    exec java $KAFKA_HEAP -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
      -Dlog4j2.configurationFile="$0/log4j2.yaml" -Dkafka.logs.dir="$1" \
      -cp "$0/lib/*" kafka.Kafka "$2/server.properties"' "$here" "$state/logs/node$n" "$dir" \
      >"$state/logs/node$n/stdout.log" 2>&1 < /dev/null &
  echo $! > "$(pidfile "$n")"
}

wait_ready() {  # wait_ready N...: until each node logs that it started and its port answers
  local n
  for _ in $(seq 1 360); do
    local ready=1
    for n in "$@"; do
      if ! running "$n"; then say "node $n exited during startup; see $state/logs/node$n/stdout.log:"
        tail -n 20 "$state/logs/node$n/stdout.log" >&2; exit 1; fi
      if ! { port_open "$(client_port "$n")" && grep -q "Kafka Server started" "$state/logs/node$n/server.log" 2>/dev/null; }; then
        ready=0; fi
    done
    [ $ready -eq 1 ] && return
    sleep 0.5
  done
  say "nodes $* did not become ready in 180 s; see $state/logs/node*/server.log"; exit 1
}

grant_acls() {
  [ -f "$state/acls-granted" ] && [ "$(cat "$state/acls-granted")" = "$prefixes" ] && return
  say "granting User:tagstream its topics, groups and transactional ids (prefixes: $prefixes)"
  local prefix args=()
  for prefix in $prefixes; do
    args=(--bootstrap-server "$(bootstrap)" --command-config "$state/secrets/admin.properties"
          --add --allow-principal User:tagstream --resource-pattern-type prefixed --operation All)
    java_tool org.apache.kafka.tools.AclCommand "${args[@]}" --topic "$prefix" >/dev/null
    java_tool org.apache.kafka.tools.AclCommand "${args[@]}" --group "$prefix" >/dev/null
    java_tool org.apache.kafka.tools.AclCommand "${args[@]}" --transactional-id "$prefix" >/dev/null
  done
  echo "$prefixes" > "$state/acls-granted"
}

start() {
  bash "$here/kafka.sh" install
  make_secrets
  make_tls
  local n started=()
  for n in "${nodes[@]}"; do
    configure "$n"
    if running "$n"; then continue; fi
    if port_open "$(client_port "$n")"; then say "port $(client_port "$n") is taken by another process"; exit 1; fi
    launch "$n"; started+=("$n")
  done
  [ ${#started[@]} -gt 0 ] && say "starting nodes ${started[*]} (heap: $heap)"
  wait_ready "${nodes[@]}"
  grant_acls
  say "ready: SASL_SSL on $(bootstrap)"
}

start_node() {
  local n=$1
  running "$n" && { say "node $n already runs"; return; }
  launch "$n"
  wait_ready "$n"
  say "node $n ready on 127.0.0.1:$(client_port "$n")"
}

stop_node() {
  local n=$1 pid
  running "$n" || { rm -f "$(pidfile "$n")"; return; }
  pid=$(cat "$(pidfile "$n")")
  kill "$pid"
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || { rm -f "$(pidfile "$n")"; return; }; sleep 0.5; done
  kill -9 "$pid" 2>/dev/null || true; rm -f "$(pidfile "$n")"
}

case "${1:-}" in
  start) start ;;
  stop) for n in "${nodes[@]}"; do stop_node "$n" & done; wait; say "stopped" ;;
  reset) for n in "${nodes[@]}"; do stop_node "$n" & done; wait; rm -rf "$state"; say "state deleted" ;;
  status) up=0; for n in "${nodes[@]}"; do if running "$n"; then say "node $n running (pid $(cat "$(pidfile "$n")"))"; up=$((up + 1)); else say "node $n not running"; fi; done
          [ $up -eq 3 ] ;;
  kill) n=${2:?node number 1-3}; running "$n" && kill -9 "$(cat "$(pidfile "$n")")"; rm -f "$(pidfile "$n")"; say "node $n killed" ;;
  start-node) start_node "${2:?node number 1-3}" ;;
  stop-node) stop_node "${2:?node number 1-3}"; say "node $2 stopped" ;;
  controller) java_tool org.apache.kafka.tools.MetadataQuorumCommand --bootstrap-server "$(bootstrap)" \
                --command-config "$state/secrets/admin.properties" describe --status 2>/dev/null \
              | sed -n 's/^LeaderId:[[:space:]]*//p' ;;
  env) cat <<EOF
TAGSTREAM_BROKER=$(bootstrap | sed 's#\([^,]*\)#kafka://\1#g')
TAGSTREAM_SECURITY_PROTOCOL=SASL_SSL
TAGSTREAM_SASL_MECHANISM=SCRAM-SHA-512
TAGSTREAM_SASL_USERNAME=tagstream
TAGSTREAM_SASL_PASSWORD_FILE=$state/secrets/tagstream.password
TAGSTREAM_SSL_CAFILE=$state/tls/ca.pem
TAGSTREAM_REPLICATION_FACTOR=3
TAGSTREAM_MIN_INSYNC_REPLICAS=2
EOF
  ;;
  tool) shift; java_tool "$@" ;;
  *) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
