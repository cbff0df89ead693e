"""NAT profiles (RFC 4787 terms) and the nftables ruleset that makes each one.

All profiles SNAT with Linux conntrack, which keeps the source port when it is
free (port-preserving, endpoint-independent mapping) unless told ``random``
(a fresh random port per conntrack entry, i.e. per destination: symmetric).
Conntrack alone filters address-and-port-dependently; the looser filters are
built from two maps the router learns from its own outgoing packets:

``ports``       mapped port -> internal ip . port   (full cone; hairpinning)
``peers``       remote ip . mapped port -> internal ip . port   (restricted)

Both are refreshed by every outgoing packet of a binding and expire with the
binding timeout, like the conntrack entries themselves.

=================  ====================================  =============================
profile            mapping                               filtering
=================  ====================================  =============================
none               (public host, no NAT)                 -
full-cone          endpoint-independent, port-preserving endpoint-independent
restricted         endpoint-independent                  address-dependent
port-restricted    endpoint-independent                  address-and-port-dependent
symmetric          address-and-port-dependent, random    address-and-port-dependent
=================  ====================================  =============================

Options: hairpinning, UDP binding timeout, random loss (nftables ``numgen``:
this kernel has no ``tc netem``), blocking all UDP, no input firewall, and a
port-mapping daemon (Debian's ``miniupnpd-nftables``: UPnP IGD, NAT-PMP, PCP;
:func:`miniupnpd_ruleset` and :func:`miniupnpd_config`).

Without an input firewall (``input_firewall=False``: a plain ``masquerade``
gateway, as on VPS and cloud NAT instances, Docker hosts and many small Linux
routers) an unsolicited packet to the WAN address reaches the router's own
stack, which answers ICMP port unreachable, and conntrack *keeps an entry for
it*. When a host behind the router later sends to that same remote address
and port, SNAT finds the tuple taken and picks another port: a peer's punch
that arrives before our own first packet spoils our mapping towards it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

PROFILES = ("none", "full-cone", "restricted", "port-restricted", "symmetric")
PORTMAP_KINDS = ("", "all", "upnp")
#: Kernel defaults, used for map expiry when no timeout is set: conntrack keeps
#: a UDP flow 30 s after one exchange and 120 s once it is a "stream".
DEFAULT_BINDING_TIMEOUT = 120


@dataclass(frozen=True)
class NatProfile:
    """One NAT box's behaviour."""

    kind: str = "port-restricted"
    hairpin: bool = False
    #: UDP binding timeout in seconds (None: kernel defaults 30 s / 120 s).
    udp_timeout: int | None = None
    #: Percentage of forwarded packets dropped at random, each direction.
    loss: int = 0
    block_udp: bool = False
    #: Unsolicited UDP to the router is dropped (home routers); False: its stack gets it.
    input_firewall: bool = True
    #: The router runs miniupnpd for its LAN: "all" (UPnP IGD, NAT-PMP and PCP), "upnp"
    #: (UPnP IGD only), or "" (no port mapping).
    portmap: str = ""

    def __post_init__(self) -> None:
        if self.kind not in PROFILES:
            raise ValueError(f"unknown NAT profile {self.kind!r}; choose from {', '.join(PROFILES)}")
        if not 0 <= self.loss <= 100:
            raise ValueError("loss is a percentage, 0 to 100")
        if self.portmap not in PORTMAP_KINDS:
            raise ValueError(f"portmap is one of {', '.join(repr(k) for k in PORTMAP_KINDS)}")
        if self.udp_timeout is not None and self.udp_timeout < 1:
            raise ValueError("udp_timeout must be at least 1 s")

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def expected(self) -> dict[str, object]:
        """What `p2pim nat` must report behind this NAT (the lab's ground truth)."""
        if self.block_udp:
            return {"label": "blocked"}
        if self.kind == "none":
            return {
                "nat_present": False,
                "mapping": "endpoint-independent",
                "filtering": "endpoint-independent",
                "label": "open internet",
            }
        mapping, filtering, label = {
            "full-cone": ("endpoint-independent", "endpoint-independent", "full cone"),
            "restricted": ("endpoint-independent", "address-dependent", "restricted cone"),
            "port-restricted": ("endpoint-independent", "address-and-port-dependent", "port-restricted cone"),
            "symmetric": ("address-and-port-dependent", "address-and-port-dependent", "symmetric"),
        }[self.kind]
        return {
            "nat_present": True,
            "mapping": mapping,
            "filtering": filtering,
            "port_preserved": self.kind != "symmetric",
            "hairpin": self.hairpin,
            "label": label,
        }


def ruleset(profile: NatProfile, wan_ip: str, lan_net: str, wan: str = "wan", lan: str = "lan") -> str:
    """The nftables ruleset for a NAT router; load with ``nft -f -``."""
    if profile.kind == "none":
        raise ValueError("profile 'none' has no router")
    timeout = profile.udp_timeout or DEFAULT_BINDING_TIMEOUT
    random = " random" if profile.kind == "symmetric" else ""
    inbound = {
        "full-cone": f'iifname "{wan}" udp dport @ports dnat ip to udp dport map @ports',
        "restricted": (
            f'iifname "{wan}" ip saddr . udp dport @peers dnat ip to ip saddr . udp dport map @peers'
        ),
    }.get(profile.kind, "")
    hairpin_in = hairpin_out = ""
    if profile.hairpin:
        # RFC 4787 REQ-9: a LAN host reaching a mapped address gets there, and
        # sees the sender's mapped address as the source.
        hairpin_in = f'iifname "{lan}" ip daddr {wan_ip} udp dport @ports dnat ip to udp dport map @ports'
        hairpin_out = f'oifname "{lan}" ip saddr {lan_net} ct status dnat snat ip to {wan_ip}'
    forward = []
    if profile.block_udp:
        forward.append("meta l4proto udp drop")
    if profile.loss:
        forward.append(f"numgen random mod 100 < {profile.loss} drop")
    learn = []
    for direction, side in (("original", "original"), ("reply", "reply")):
        internal = f"ct {side} ip saddr . ct {side} proto-src"
        learn.append(
            f'oifname "{wan}" meta l4proto udp ct direction {direction} '
            f"update @ports {{ udp sport timeout {timeout}s : {internal} }}"
        )
        learn.append(
            f'oifname "{wan}" meta l4proto udp ct direction {direction} '
            f"update @peers {{ ip daddr . udp sport timeout {timeout}s : {internal} }}"
        )
    lines = [
        "table ip natlab {",
        "  map ports {",
        "    type inet_service : ipv4_addr . inet_service",
        "    flags dynamic,timeout",
        f"    timeout {timeout}s",
        "  }",
        "  map peers {",
        "    type ipv4_addr . inet_service : ipv4_addr . inet_service",
        "    flags dynamic,timeout",
        f"    timeout {timeout}s",
        "  }",
        "  chain prerouting {",
        "    type nat hook prerouting priority dstnat; policy accept;",
        *(f"    {r}" for r in (inbound, hairpin_in) if r),
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        f'    oifname "{wan}" masquerade{random}',
        *(f"    {r}" for r in (hairpin_out,) if r),
        "  }",
        "  chain learn {",
        "    type filter hook postrouting priority srcnat + 10; policy accept;",
        *(f"    {r}" for r in learn),
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        *(f"    {r}" for r in forward),
        "  }",
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        # Unsolicited UDP to the router itself: silence, as home routers do; without
        # the firewall the stack answers ICMP port unreachable (and conntrack keeps it).
        *([f'    iifname "{wan}" meta l4proto udp drop'] if profile.input_firewall else []),
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def sysctls(profile: NatProfile) -> dict[str, str]:
    """Per-namespace kernel settings for the router."""
    out = {"net.ipv4.ip_forward": "1"}
    if profile.udp_timeout is not None:
        out["net.netfilter.nf_conntrack_udp_timeout"] = str(profile.udp_timeout)
        out["net.netfilter.nf_conntrack_udp_timeout_stream"] = str(profile.udp_timeout)
    return out


#: The nftables objects miniupnpd adds its rules to (its Debian package ships a script
#: for this that needs a file it does not ship). The forward chain only jumps: our own
#: forward policy stays in force. Its postrouting runs just before our masquerade, so a
#: mapping's SNAT (the mapped port for the host's own outgoing packets) wins.
MINIUPNPD_TABLE = "miniupnpd"


def miniupnpd_ruleset() -> str:
    t = MINIUPNPD_TABLE
    return f"""table inet {t} {{
  chain forward {{
    type filter hook forward priority filter - 1; policy accept;
    jump miniupnpd
  }}
  chain miniupnpd {{
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat - 1; policy accept;
    jump prerouting_miniupnpd
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat - 1; policy accept;
    jump postrouting_miniupnpd
  }}
  chain prerouting_miniupnpd {{
  }}
  chain postrouting_miniupnpd {{
  }}
}}
"""


def miniupnpd_config(lan_net: str, state_dir: str, kind: str = "all") -> str:
    """miniupnpd.conf for a natlab router: WAN ``wan``, LAN ``lan``, mappings only for its LAN
    hosts and only to their own address (secure mode), leases kept in ``state_dir``; ``kind``
    "upnp" turns NAT-PMP and PCP off (miniupnpd serves those two together)."""
    return "\n".join(
        [
            "ext_ifname=wan",
            "listening_ip=lan",
            f"enable_natpmp={'no' if kind == 'upnp' else 'yes'}",
            "enable_upnp=yes",
            "secure_mode=yes",
            "system_uptime=no",
            f"upnp_table_name={MINIUPNPD_TABLE}",
            f"upnp_nat_table_name={MINIUPNPD_TABLE}",
            "upnp_forward_chain=miniupnpd",
            "upnp_nat_chain=prerouting_miniupnpd",
            "upnp_nat_postrouting_chain=postrouting_miniupnpd",
            f"lease_file={state_dir}/leases",
            "min_lifetime=60",
            "max_lifetime=86400",
            f"allow 1024-65535 {lan_net} 1024-65535",
            "deny 0-65535 0.0.0.0/0 0-65535",
            "",
        ]
    )
