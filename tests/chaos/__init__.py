"""The chaos suite (issue 8): the whole system under faults, against the reference model.
See tests/chaos/harness.py; `make chaos` runs it at full size."""
