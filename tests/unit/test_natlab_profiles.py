"""natlab's profile -> nftables translation (no root needed)."""

from __future__ import annotations

import pytest

from natlab.profiles import PROFILES, NatProfile, miniupnpd_config, miniupnpd_ruleset, ruleset, sysctls
from natlab.topology import firewall6


def rules(kind: str, **kw: object) -> str:
    return ruleset(NatProfile(kind, **kw), "203.0.113.101", "10.0.1.0/24")  # type: ignore[arg-type]


def test_mapping_and_filtering_rules_per_profile() -> None:
    assert "masquerade random" in rules("symmetric")
    for kind in ("full-cone", "restricted", "port-restricted"):
        assert "masquerade random" not in rules(kind)
        assert 'oifname "wan" masquerade' in rules(kind)
    assert 'iifname "wan" udp dport @ports dnat' in rules("full-cone")
    assert "ip saddr . udp dport @peers dnat" in rules("restricted")
    for kind in ("port-restricted", "symmetric"):
        assert 'iifname "wan"' not in rules(kind).split("chain prerouting")[1].split("}")[0]


def test_options() -> None:
    assert "hairpin" not in rules("full-cone") and "@ports dnat" not in rules("port-restricted")
    hp = rules("port-restricted", hairpin=True)
    assert 'iifname "lan" ip daddr 203.0.113.101 udp dport @ports dnat' in hp
    assert "snat ip to 203.0.113.101" in hp
    assert "numgen random mod 100 < 10 drop" in rules("full-cone", loss=10)
    assert "meta l4proto udp drop" in rules("full-cone", block_udp=True).split("chain forward")[1]
    assert "timeout 7s" in rules("full-cone", udp_timeout=7)
    assert sysctls(NatProfile("full-cone", udp_timeout=7))["net.netfilter.nf_conntrack_udp_timeout"] == "7"


def test_router_kinds_without_input_firewall_with_port_mapping_and_ipv6() -> None:
    def input_chain(text: str) -> str:
        return text.split("chain input")[1].split("}")[0]

    assert 'iifname "wan" meta l4proto udp drop' in input_chain(rules("port-restricted"))
    assert "drop" not in input_chain(rules("port-restricted", input_firewall=False))
    full = miniupnpd_config("10.0.1.0/24", "/run/x", "all")
    assert "enable_natpmp=yes" in full and "allow 1024-65535 10.0.1.0/24 1024-65535" in full
    assert "secure_mode=yes" in full and full.rstrip().endswith("deny 0-65535 0.0.0.0/0 0-65535")
    assert "enable_natpmp=no" in miniupnpd_config("10.0.1.0/24", "/run/x", "upnp")
    table = miniupnpd_ruleset()
    assert "priority srcnat - 1" in table and "jump prerouting_miniupnpd" in table
    v6 = firewall6()
    assert "ct state established,related accept" in v6 and 'iifname "wan" drop' in v6


def test_expectations_cover_every_profile() -> None:
    for kind in PROFILES:
        exp = NatProfile(kind).expected()
        assert exp["label"]
    assert NatProfile("symmetric").expected()["port_preserved"] is False
    assert NatProfile("full-cone", block_udp=True).expected() == {"label": "blocked"}


def test_bad_profiles_are_refused() -> None:
    with pytest.raises(ValueError):
        NatProfile("cone")
    with pytest.raises(ValueError):
        NatProfile("full-cone", loss=101)
    with pytest.raises(ValueError):
        ruleset(NatProfile("none"), "203.0.113.1", "10.0.0.0/24")
    with pytest.raises(ValueError):
        NatProfile("full-cone", portmap="natpmp")
