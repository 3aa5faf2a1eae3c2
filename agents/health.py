"""The worker's own state as Prometheus gauges, refreshed by a timer: rebalancing and table
recovery, assigned partitions, table sizes, held reports and hot customers. (Consumer lag is exported by
`streams.observability.lag`, which every tagstream process runs.)"""
from __future__ import annotations

import logging
from typing import Optional

from streams.observability import metrics

log = logging.getLogger(__name__)


def faust_table_keys(table, partition: int) -> Optional[int]:
    """RocksDB's key estimate for one partition of a Faust table (None if not open here).
    An estimate is free; counting 1M keys exactly would stall the event loop."""
    db = getattr(table.data, "_dbs", {}).get(partition)
    if db is None:
        return None
    try:
        return db.property_int_value("rocksdb.estimate-num-keys")
    except Exception:        # another driver, or a closed database during a rebalance
        return None


class WorkerHealth:
    def __init__(self, app, table_keys: dict, held_reports, input_topics: list[str], restoring=lambda: False,
                 hot_customer_shares=dict):
        """`table_keys` maps a table's name to `keys(partition) -> Optional[int]`;
        `held_reports(partition) -> Optional[int]` reads the count from the state table;
        `restoring()` is True while tagstream's own store restores from its changelog;
        `hot_customer_shares()` takes {partition: busiest customer's share} since the last call."""
        self.app = app
        self.hot_customer_shares = hot_customer_shares
        self.table_keys = table_keys
        self.restoring = restoring
        self.held_reports = held_reports
        self.input_topics = input_topics
        self.exported_partitions: set[int] = set()

    def on_assigned(self) -> None:
        metrics.REBALANCES.inc()

    def refresh(self) -> None:
        metrics.beat()                  # /healthz: the worker's event loop runs this timer
        app = self.app
        metrics.REBALANCING.set(1 if app.rebalancing else 0)
        recovering = app.in_recovery or self.restoring()
        metrics.RECOVERING.set(1 if recovering else 0)
        assignment = app.consumer.assignment() if app.consumer else set()
        for topic in self.input_topics:
            metrics.ASSIGNED_PARTITIONS.labels(topic).set(sum(1 for tp in assignment if tp.topic == topic))
        partitions = {tp.partition for tp in assignment if tp.topic == self.input_topics[0]}
        for gone in self.exported_partitions - partitions:
            for name in self.table_keys:
                _remove(metrics.TABLE_KEYS, name, str(gone))
            _remove(metrics.HELD_REPORTS, str(gone))
            _remove(metrics.HOT_CUSTOMER_SHARE, str(gone))
        self.exported_partitions = partitions
        shares = self.hot_customer_shares()
        for partition in partitions:
            metrics.HOT_CUSTOMER_SHARE.labels(str(partition)).set(shares.get(partition, 0.0))
        if recovering:
            return                      # tables are being restored; their counts mean nothing yet
        for partition in partitions:
            for name, keys_of in self.table_keys.items():
                keys = keys_of(partition)
                if keys is not None:
                    metrics.TABLE_KEYS.labels(name, str(partition)).set(keys)
            held = self.held_reports(partition)
            if held is not None:
                metrics.HELD_REPORTS.labels(str(partition)).set(held)


def _remove(gauge, *labels: str) -> None:
    try:
        gauge.remove(*labels)
    except KeyError:
        pass
