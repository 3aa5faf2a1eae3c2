"""A local fake WeCom (WECOM.md §7): the only stand-in for WeCom, implementing its documented
contract and failure modes.

- `callbacks`: signed, encrypted callbacks POSTed to the ingest, with WeCom's retries;
- `api`:       the REST API the enrichment calls (tokens, contacts, tags), with its errcodes.
"""
