"""WeCom's callback security and XML (streams/wecom/crypto.py, messages.py), no broker:
the official test vector, round trips, and each way a callback is refused."""
import base64

import pytest
from hypothesis import given, settings, strategies as st

from streams.wecom.crypto import CallbackCrypto, Refused, signature
from streams.wecom.messages import MAX_BODY_BYTES, Envelope, parse_flat

# WECOM.md §1: the official WXBizMsgCrypt samples' vector
TOKEN = "hJqcu3uJ9Tn2gXPmxx2w9kkCkCE2EPYo"
AES_KEY = "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt"
CORP = "ww1436e0e65a779aee"
ECHOSTR = "fsi1xnbH4yQh0+PJxcOdhhK6TDXkjMyhEPA7xB2TGz6b+g7xyAbEkRxN/3cNXW9qdqjnoVzEtpbhnFyq6SVHyA=="


def test_the_official_url_verification_vector():
    crypto = CallbackCrypto(TOKEN, AES_KEY)
    crypto.verify("012bc692d0a58dd4b10f8dfe5c4ac00ae211ebeb", "1476416373", "47744683", ECHOSTR)
    assert crypto.decrypt(ECHOSTR, CORP) == b"1288432023552776189"


def test_the_vector_s_signature_is_the_sorted_sha1():
    assert signature(TOKEN, "1476416373", "47744683", ECHOSTR) == "012bc692d0a58dd4b10f8dfe5c4ac00ae211ebeb"


def test_a_changed_timestamp_or_nonce_breaks_the_signature():
    crypto = CallbackCrypto(TOKEN, AES_KEY)
    for timestamp, nonce in (("1476416374", "47744683"), ("1476416373", "47744684")):
        with pytest.raises(Refused) as refused:
            crypto.verify("012bc692d0a58dd4b10f8dfe5c4ac00ae211ebeb", timestamp, nonce, ECHOSTR)
        assert refused.value.reason == "bad_signature"


def test_the_wrong_receive_id_is_refused():
    with pytest.raises(Refused) as refused:
        CallbackCrypto(TOKEN, AES_KEY).decrypt(ECHOSTR, "ww_another_corp")
    assert refused.value.reason == "wrong_receive_id"


def test_the_wrong_key_is_refused_not_misread():
    other = CallbackCrypto(TOKEN, base64.b64encode(bytes(range(32))).decode().rstrip("="))
    with pytest.raises(Refused) as refused:
        other.decrypt(ECHOSTR, CORP)
    assert refused.value.reason in ("bad_ciphertext", "wrong_receive_id")


@pytest.mark.parametrize("encrypted", ["not base64 !", "", base64.b64encode(b"x" * 15).decode()])
def test_garbage_ciphertext_is_refused(encrypted):
    with pytest.raises(Refused) as refused:
        CallbackCrypto(TOKEN, AES_KEY).decrypt(encrypted, CORP)
    assert refused.value.reason == "bad_ciphertext"


@given(message=st.binary(max_size=3000), receive_id=st.text(max_size=40), random16=st.binary(min_size=16, max_size=16))
@settings(max_examples=200)
def test_what_is_encrypted_decrypts_to_itself(message, receive_id, random16):
    crypto = CallbackCrypto(TOKEN, AES_KEY)
    encrypted = crypto.encrypt(message, receive_id, random16)
    assert len(base64.b64decode(encrypted)) % 32 == 0          # WeCom pads to 32 bytes
    assert crypto.decrypt(encrypted, receive_id) == message


def test_secrets_stay_out_of_the_object_s_repr():
    assert TOKEN not in repr(CallbackCrypto(TOKEN, AES_KEY)) and AES_KEY not in repr(CallbackCrypto(TOKEN, AES_KEY))


def test_a_bad_encoding_aes_key_is_a_configuration_error():
    with pytest.raises(ValueError, match="43 characters"):
        CallbackCrypto(TOKEN, AES_KEY[:-1])


# -- XML --------------------------------------------------------------------------------------
BOMB = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<xml><Encrypt>&lol3;</Encrypt></xml>"""
EXTERNAL = b"""<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><xml><Encrypt>&e;</Encrypt></xml>"""


@pytest.mark.parametrize("body", [BOMB, EXTERNAL, b"<xml><Encrypt>abc</Encrypt>", b"\xff\xfe",
                                  b"<xml><Encrypt><b>nested</b></Encrypt></xml>", b"<xml></xml>"])
def test_unsafe_or_malformed_envelopes_are_refused(body):
    with pytest.raises(Refused) as refused:
        Envelope.parse(body)
    assert refused.value.reason == "bad_xml"


def test_an_oversized_body_is_refused_before_parsing():
    with pytest.raises(Refused) as refused:
        Envelope.parse(b"<xml><Encrypt>" + b"A" * MAX_BODY_BYTES + b"</Encrypt></xml>")
    assert refused.value.reason == "too_large"


def test_an_envelope_and_its_message():
    envelope = Envelope.parse(b"<xml><ToUserName><![CDATA[ww1]]></ToUserName><Encrypt><![CDATA[abc=]]></Encrypt>"
                              b"<AgentID><![CDATA[1000002]]></AgentID></xml>")
    assert (envelope.to_user_name, envelope.encrypted, envelope.agent_id) == ("ww1", "abc=", "1000002")
    fields = parse_flat("<xml><ChangeType><![CDATA[edit_external_contact]]></ChangeType>"
                        "<UserID>张三</UserID></xml>".encode(), "message")
    assert fields == {"ChangeType": "edit_external_contact", "UserID": "张三"}


@given(st.binary(max_size=2000))
@settings(max_examples=300)
def test_arbitrary_bytes_never_raise_anything_but_refused(body):
    try:
        Envelope.parse(body)
    except Refused:
        pass
