"""Loads the JSON Schema files in `schemas/json/` that describe tagstream's wire formats (SPEC §3)."""
from __future__ import annotations

import json
from importlib.resources import files

#: Every schema shipped in `schemas/json/`, as `<name>.schema.json`.
SCHEMA_NAMES = ("tag_event", "contact_event", "reporting_rule", "conversion_report", "dead_letter")


def load_schema(name: str) -> dict:
    """The parsed schema called `name` (e.g. "tag_event"); a fresh dict on every call."""
    if name not in SCHEMA_NAMES:
        raise ValueError(f"unknown schema {name!r}; expected one of {', '.join(SCHEMA_NAMES)}")
    return json.loads(files("schemas").joinpath("json").joinpath(f"{name}.schema.json")
                      .read_text(encoding="utf-8"))
