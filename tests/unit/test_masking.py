"""The one mask for URLs, headers and endpoint data shown anywhere (router/masking.py)."""

from __future__ import annotations

import pytest

from router.masking import mask_headers, mask_text, mask_url, masked


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://siem.example/ingest", "https://siem.example/ingest"),
        ("https://siem.example/i?tenant=a&b=c", "https://siem.example/i?tenant=a&b=c"),
        ("http://svc:SUPERSECRET@host:8080/x", "http://svc:REDACTED@host:8080/x"),
        ("http://ghp_TOKEN@host/x", "http://REDACTED@host/x"),
        ("https://h/x?token=T1&tenant=a", "https://h/x?token=REDACTED&tenant=a"),
        (
            "https://h/x?sig=S&apiKey=K&X-Amz-Signature=Z",
            "https://h/x?sig=REDACTED&apiKey=REDACTED&X-Amz-Signature=REDACTED",
        ),
        (
            "https://h/x?client_secret=S&password=P",
            "https://h/x?client_secret=REDACTED&password=REDACTED",
        ),
        ("http://u:p@[::1/x", "http://REDACTED@[::1/x"),
    ],
)
def test_mask_url_hides_userinfo_and_secret_query_values(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_mask_text_masks_every_url_in_a_message() -> None:
    text = "POST http://svc:SUPERSECRET@127.0.0.1:9/x?key=K: Cannot connect, see https://a/b"
    assert mask_text(text) == (
        "POST http://svc:REDACTED@127.0.0.1:9/x?key=REDACTED: Cannot connect, see https://a/b"
    )


def test_headers_with_credentials_or_references_are_masked() -> None:
    assert mask_headers(
        {
            "Authorization": "Bearer x",
            "cookie": "a=b",
            "X-Api-Key": "k",
            "X-Auth-Token": "t",
            "X-Tenant": "audit",
            "X-From-Ref": "${env:SOMETHING}",
        }
    ) == {
        "Authorization": "REDACTED",
        "cookie": "REDACTED",
        "X-Api-Key": "REDACTED",
        "X-Auth-Token": "REDACTED",
        "X-Tenant": "audit",
        "X-From-Ref": "REDACTED",
    }


def test_endpoint_data_masks_keys_urls_and_headers_at_any_depth() -> None:
    assert masked(
        {
            "url": "https://u:p@h/x",
            "auth": {"type": "basic", "username": "u", "password": "${env:P}"},
            "headers": {"Cookie": "c"},
            "timeout_s": 3,
        },
        "http_endpoint",
    ) == {
        "url": "https://u:REDACTED@h/x",
        "auth": {"type": "basic", "username": "u", "password": "REDACTED"},
        "headers": {"Cookie": "REDACTED"},
        "timeout_s": 3,
    }
