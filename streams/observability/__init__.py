"""What an operator sees: every Prometheus metric, consumer lag, hot customers, and reading a
running worker.

- `metrics`: every metric tagstream exports, defined once;
- `lag`: consumer lag in messages and in seconds (Faust has no lag metric);
- `observe`: a running worker's `/metrics`, read and summed from outside;
- `hot_keys`: the busiest customer's share of each partition (a bounded heavy-hitter count).
"""
