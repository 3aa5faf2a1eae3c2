#!/bin/sh
# The Kafka image's entry point: one KRaft node (broker and controller), as deploy/kafka's
# local broker, with its listener and advertised address from the environment:
#   KAFKA_LISTEN      host:port the broker listens on (default 0.0.0.0:9092)
#   KAFKA_ADVERTISED  host:port clients are told to use (default 127.0.0.1:9092)
#   KAFKA_HEAP        JVM heap flags (default -Xms512m -Xmx1g)
# Storage in /var/lib/kafka/data is formatted on the first start only.
set -eu
listen=${KAFKA_LISTEN:-0.0.0.0:9092}
advertised=${KAFKA_ADVERTISED:-127.0.0.1:9092}
controller=${KAFKA_CONTROLLER:-127.0.0.1:9093}
conf=/var/lib/kafka/server.properties
grep -v -E '^(listeners|advertised.listeners|controller.quorum.voters|log.dirs)=' /opt/kafka/config/server.properties > "$conf"
cat >> "$conf" <<PROPS
listeners=PLAINTEXT://$listen,CONTROLLER://$controller
advertised.listeners=PLAINTEXT://$advertised
controller.quorum.voters=1@$controller
log.dirs=/var/lib/kafka/data
PROPS
run() { java -Dlog4j2.configurationFile=/opt/kafka/config/log4j2.yaml -Dkafka.logs.dir=/var/lib/kafka/logs -cp '/opt/kafka/libs/*' "$@"; }
mkdir -p /var/lib/kafka/data /var/lib/kafka/logs
if [ ! -f /var/lib/kafka/data/meta.properties ]; then
  run kafka.tools.StorageTool format -t "$(run kafka.tools.StorageTool random-uuid | tail -n 1)" -c "$conf" >/dev/null
fi
# shellcheck disable=SC2086
exec java ${KAFKA_HEAP:--Xms512m -Xmx1g} -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
  -Dlog4j2.configurationFile=/opt/kafka/config/log4j2.yaml -Dkafka.logs.dir=/var/lib/kafka/logs \
  -cp '/opt/kafka/libs/*' kafka.Kafka "$conf"
