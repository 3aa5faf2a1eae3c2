"""Conversion reports as the worker emits them (SPEC §3), generated for the sink's tests and
benchmark: many corps, accounts and user action sets, a mix of identities and types."""
from __future__ import annotations

import hashlib
import random


def sample_reports(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    types = [("CONSULT", "WECOM_CONSULT", None), ("LEAD", "RESERVATION", None),
             ("LONG_TERM", "CUSTOM", "LONG_TERM_CONVERSION")]
    out = []
    for i in range(n):
        corp, customer = f"ww{i % 17}", f"wm{i:06d}"
        standard_type, action_type, custom_action = types[i % 3]
        oid = hashlib.sha256(f"{corp}|{customer}|{standard_type}".encode()).hexdigest()
        identity = ({"user_id": {"wechat_app_id": "wx1", "wechat_unionid": f"u{i}"}, "trace": {}}
                    if i % 4 else {"user_id": {}, "trace": {"click_id": f"clk{i}"}})
        out.append({"outer_action_id": oid, "account_id": 2000 + i % 23, "user_action_set_id": 11000 + i % 2,
                    "action_type": action_type, "custom_action": custom_action,
                    "action_time": 1763884800 + rng.randrange(86400), **identity,
                    "standard_type": standard_type, "mode": "realtime", "reason": None, "corp_id": corp,
                    "external_userid": customer, "tag_id": "t1", "source_event_id": f"e{i}",
                    "event_ts": 1763884800000, "emitted_at": 1763884800100})
    return out
