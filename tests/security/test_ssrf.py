"""Webhook URLs reach only globally routable unicast addresses, whatever form the address takes."""

from __future__ import annotations

import pytest

from domain import webhooks

REFUSED = [
    "http://100.64.0.1/x",                 # shared address space (carrier-grade NAT)
    "http://100.100.100.200/latest/",      # a cloud metadata service inside 100.64.0.0/10
    "http://169.254.169.254/latest/",      # link-local metadata
    "http://224.0.0.1/x",                  # multicast
    "http://0.0.0.0/x",
    "http://240.0.0.1/x",                  # reserved
    "http://198.18.0.1/x",                 # benchmarking range
    "http://[2002:a00:1::1]/x",            # 6to4, tunnelling to 10.0.0.1
    "http://[2001:0:4136:e378:8000:63bf:f5ff:fffe]/x",  # Teredo
    "http://[fec0::1]/x",                  # site-local
    "http://[64:ff9b::a00:1]/x",           # NAT64 of 10.0.0.1
    "http://[::ffff:10.0.0.1]/x",          # IPv4-mapped private
    "http://[fd00::1]/x",                  # unique local
]


@pytest.mark.parametrize("url", REFUSED)
def test_non_global_addresses_are_refused(url: str) -> None:
    with pytest.raises(webhooks.UnsafeURL):
        webhooks.resolve_safe(url, allow_private=False)


@pytest.mark.parametrize("url", ["http://8.8.8.8/hook", "https://[2606:4700:4700::1111]/hook",
                                 "http://[64:ff9b::808:808]/hook"])
def test_global_addresses_pass(url: str) -> None:
    assert webhooks.resolve_safe(url, allow_private=False)[2]
