#!/usr/bin/env bash
# The local single-node KRaft broker: install | start | stop | status | tool CLASS ARGS...
#
#   install  fetch the pinned jars (pom.xml) from Maven Central into deploy/kafka/lib
#   start    install if needed, format storage once, start the broker on 127.0.0.1:9092 and
#            wait until it serves requests. Idempotent: a running broker is left alone.
#   stop     stop the broker (SIGTERM, then SIGKILL after 30 s)
#   reset    stop and delete all broker data
#   cluster  the three-node secured cluster instead: kafka.sh cluster start|stop|... (cluster.sh)
#   tool     run a Kafka command-line tool class, e.g.
#            kafka.sh tool org.apache.kafka.tools.consumer.group.ConsumerGroupCommand --describe ...
#
# Environment: TAGSTREAM_KAFKA_STATE (default <repo>/.state/kafka), KAFKA_HEAP_OPTS.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
state=${TAGSTREAM_KAFKA_STATE:-$repo/.state/kafka}
lib=$here/lib
pidfile=$state/kafka.pid
# A 2-core, 24 GiB machine: 1 GiB of heap is plenty for one broker and leaves the rest to
# the page cache, which is what Kafka really reads from.
heap=${KAFKA_HEAP_OPTS:--Xms512m -Xmx1g}

say() { printf 'kafka: %s\n' "$*" >&2; }

install() {
  if [ -f "$lib/.complete" ] && [ "$lib/.complete" -nt "$here/pom.xml" ]; then return; fi
  command -v mvn >/dev/null || { say "mvn not found: install Maven (apt-get install maven)"; exit 1; }
  say "fetching pinned Kafka jars from Maven Central (pom.xml) ..."
  rm -rf "$lib"
  mvn -q -B -Dstyle.color=never -f "$here/pom.xml" dependency:copy-dependencies \
      -DoutputDirectory="$lib" -DincludeScope=runtime
  touch "$lib/.complete"
}

java_run() {  # java_run MAIN ARGS...
  exec_java=(java -Dlog4j2.configurationFile="$here/log4j2.yaml" -Dkafka.logs.dir="$state/logs" -cp "$lib/*")
  "${exec_java[@]}" "$@"
}

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

port_open() { (exec 3<>/dev/tcp/127.0.0.1/9092) 2>/dev/null; }

format_storage() {
  mkdir -p "$state/data" "$state/logs"
  sed "s#^log.dirs=.*##" "$here/server.properties" > "$state/server.properties"
  echo "log.dirs=$state/data" >> "$state/server.properties"
  if [ ! -f "$state/data/meta.properties" ]; then
    local cluster_id
    cluster_id=$(java_run kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1)
    say "formatting storage in $state/data (cluster $cluster_id)"
    java_run kafka.tools.StorageTool format -t "$cluster_id" -c "$state/server.properties" >/dev/null
  fi
}

start() {
  install
  if running && port_open; then say "already running (pid $(cat "$pidfile"))"; return; fi
  if port_open; then say "something else is listening on 127.0.0.1:9092; stop it first"; exit 1; fi
  format_storage
  say "starting broker (heap: $heap)"
  # setsid: the broker outlives the shell that started it, and a Ctrl-C in that shell
  # does not reach it.
  KAFKA_HEAP="$heap" setsid bash -c '
    exec java $KAFKA_HEAP -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
      -Dlog4j2.configurationFile="$0/log4j2.yaml" -Dkafka.logs.dir="$1/logs" \
      -cp "$0/lib/*" kafka.Kafka "$1/server.properties"' "$here" "$state" \
      >"$state/logs/stdout.log" 2>&1 < /dev/null &
  echo $! > "$pidfile"
  for _ in $(seq 1 240); do
    if ! running; then say "broker exited during startup; see $state/logs/stdout.log:"; tail -n 20 "$state/logs/stdout.log" >&2; exit 1; fi
    if port_open && grep -q "Kafka Server started" "$state/logs/server.log" 2>/dev/null; then
      say "ready on 127.0.0.1:9092 (pid $(cat "$pidfile"))"; return
    fi
    sleep 0.5
  done
  say "broker did not become ready in 120 s; see $state/logs/server.log"; exit 1
}

stop() {
  running || { say "not running"; rm -f "$pidfile"; return; }
  local pid; pid=$(cat "$pidfile")
  kill "$pid"
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; say "stopped"; return; }; sleep 0.5; done
  kill -9 "$pid" 2>/dev/null || true; rm -f "$pidfile"; say "killed after 30 s"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  reset) stop; rm -rf "$state"; say "state deleted" ;;
  status) if running && port_open; then say "running (pid $(cat "$pidfile"))"; else say "not running"; exit 1; fi ;;
  tool) shift; install; java_run "$@" ;;
  cluster) shift; exec bash "$here/cluster.sh" "$@" ;;
  *) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
