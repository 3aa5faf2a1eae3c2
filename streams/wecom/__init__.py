"""WeCom in (SPEC §7, ../shared/WECOM.md): callbacks become tag and contact events.

- `crypto`:   WXBizMsgCrypt, the callbacks' signature and AES layer;
- `messages`: the callbacks' XML, parsed without entities, into typed callbacks.
"""
