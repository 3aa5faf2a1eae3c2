"""`tagstream rules`: manage the reporting rules (SPEC §9). `plan` is the pure part (read,
check, resolve, plan versions); `run` reads the rule book and the catalogue from Kafka,
prints, and publishes."""
