"""Thin Faust agents around the pure core, grouped by domain.

Each agent decodes records (`schemas.validation`), calls the core (`streams.core.semantics`,
`streams.core.rulebook`), persists state in a table and sends what the core returned. Business
decisions live in the core, not in an `async for`. The wiring is in `streams.topology`.
"""
