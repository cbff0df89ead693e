"""Topologies of network namespaces: a public segment and private LANs behind NATs.

::

      [rdv 203.0.113.10,.11]   [pub1 203.0.113.20]        public segment 203.0.113.0/24
               |                     |                    (bridge br0 in namespace "inet")
     ==========+=========+===========+==========+==========
                         |                      |
                 wan 203.0.113.101       wan 203.0.113.102
                 [nat1: NAT profile]     [nat2: ...]        routers (nftables)
                 lan 10.0.1.1/24         lan 10.0.2.1/24    (bridge "lan")
                   |        |               |
                 [h1 .2]  [h2 .3]         [h3 10.0.2.2]     hosts, default route via the router

With ``hop=True`` the routers' WAN links do not share the public segment: each
is a point-to-point link to a core router ``hop`` (203.0.113.1, proxy ARP on
the segment), as on the Internet, where routers lie between two NATs and a
packet's TTL decides how far it gets. Addresses stay the same.

Every namespace is named ``<prefix>-<node>``, with a per-run prefix starting with
:data:`~natlab.netns.TAG`. Nothing is routed to the host's own network: these
addresses exist only inside the namespaces. Use a :class:`Topology` as a context
manager so it is torn down also on failure; ``natlab down --all`` removes what a
crashed run left.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import netns
from .netns import LabError, ip, nsexec, sh
from .profiles import NatProfile, miniupnpd_config, miniupnpd_ruleset, ruleset, sysctls

PUBLIC_NET = "203.0.113"  # TEST-NET-3 (RFC 5737): never routed anywhere
HOP = 1  # the core router's address on the public segment (with ``hop=True``)
#: WAN addresses of routers that run miniupnpd. It refuses to map on a WAN address in any
#: reserved range (documentation ranges included: "port forwarding is impossible"), so
#: those routers take theirs from here, a block its own tests count as public. Like every
#: natlab address, it exists only inside natlab's namespaces.
PORTMAP_NET = "11.0.113"
MINIUPNPD = "/usr/sbin/miniupnpd"
#: IPv6 (``ipv6=True``): the documentation prefix (RFC 3849). The public segment is
#: 2001:db8::/64 (the hop ::1, the rendezvous ::10 and ::11), router i's WAN link
#: 2001:db8:ff:i::/64 and its LAN 2001:db8:i::/64: global addresses, no NAT, behind the
#: router's stateful firewall (RFC 6092: inbound only what answers outbound).
V6 = "2001:db8"
STATE_DIR = Path("/run/natlab")
_NAME = re.compile(r"^[a-z][a-z0-9]{0,9}$")


def new_prefix() -> str:
    return f"{netns.TAG}{secrets.token_hex(3)}"


@dataclass
class Node:
    name: str
    ns: str
    kind: str  # "public", "core" (the hop), "router" or "host"
    addresses: list[str] = field(default_factory=list)
    #: For a host: its router's name. For a router: its WAN address is addresses[0].
    router: str | None = None
    #: For a router: its profile and LAN subnet.
    profile: NatProfile | None = None
    lan_net: str | None = None
    #: With IPv6: the node's global address (a router: its LAN prefix's ::1).
    ipv6: str | None = None

    @property
    def ip(self) -> str:
        return self.addresses[0]


class Topology:
    """Build with ``add_public`` / ``add_nat`` / ``add_host``; each acts at once."""

    def __init__(self, prefix: str | None = None, hop: bool = False, ipv6: bool = False) -> None:
        reason = netns.missing_requirements()
        if reason:
            raise LabError(reason)
        self.prefix = prefix or new_prefix()
        if not self.prefix.startswith(netns.TAG):
            raise LabError(f"prefix must start with {netns.TAG!r}")
        self.nodes: dict[str, Node] = {}
        self._next_public = 20
        self._next_wan = 101
        self._next_lan = 1
        self._hosts_on: dict[str, int] = {}
        self.inet = f"{self.prefix}-inet"
        self.hop: Node | None = None
        self.ipv6 = ipv6
        self._created: list[str] = []
        try:
            self._make_ns(self.inet)
            ip(self.inet, "link", "add", "br0", "type", "bridge")
            ip(self.inet, "link", "set", "br0", "up")
            if hop or ipv6:
                self._add_hop()
        except Exception:
            self.down()
            raise

    # -- building ------------------------------------------------------------
    def _make_ns(self, ns: str) -> None:
        sh(["ip", "netns", "add", ns])
        self._created.append(ns)
        ip(ns, "link", "set", "lo", "up")

    def _new_node(self, name: str, kind: str) -> Node:
        if not _NAME.match(name) or name == "inet":
            raise LabError(f"node name {name!r}: 1-10 lowercase letters/digits, starting with a letter")
        if name in self.nodes:
            raise LabError(f"node {name!r} exists")
        node = Node(name, f"{self.prefix}-{name}", kind)
        self._make_ns(node.ns)
        self.nodes[name] = node
        return node

    def _plug_public(self, node: Node, ifname: str) -> None:
        """A veth from ``node`` (named ``ifname``) to the public bridge."""
        ip(self.inet, "link", "add", node.name, "type", "veth", "peer", "name", ifname, "netns", node.ns)
        ip(self.inet, "link", "set", node.name, "master", "br0")
        ip(self.inet, "link", "set", node.name, "up")
        ip(node.ns, "link", "set", ifname, "up")

    def add_public(self, name: str, addresses: Sequence[str] | int = 1) -> Node:
        """A host on the public segment with one or more addresses."""
        node = self._new_node(name, "public")
        if isinstance(addresses, int):
            addresses = [f"{PUBLIC_NET}.{self._take_public()}" for _ in range(addresses)]
        self._plug_public(node, "eth0")
        for a in addresses:
            ip(node.ns, "addr", "add", f"{a}/24", "dev", "eth0")
        if self.hop is not None:  # routers with addresses off the segment are behind it
            ip(node.ns, "route", "add", "default", "via", self.hop.ip)
        if self.ipv6 and self.hop is not None and self.hop.ipv6:
            node.ipv6 = f"{V6}::{addresses[0].rsplit('.', 1)[1]}"
            _addr6(node.ns, f"{node.ipv6}/64", "eth0")
            ip(node.ns, "-6", "route", "add", "default", "via", self.hop.ipv6)
        node.addresses = list(addresses)
        return node

    def _take_public(self) -> int:
        n = self._next_public
        self._next_public += 1
        if n >= 100:
            raise LabError("too many public hosts")
        return n

    def _add_hop(self) -> None:
        """The core router between the public segment and every NAT's WAN link."""
        node = self.hop = self._new_node("hop", "core")
        node.addresses = [f"{PUBLIC_NET}.{HOP}"]
        self._plug_public(node, "pub")
        ip(node.ns, "addr", "add", f"{PUBLIC_NET}.{HOP}/24", "dev", "pub")
        # proxy_delay: the kernel holds proxy ARP answers up to 0.8 s by default, which would
        # show as a slow first RTT to every NAT.
        for key in (
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.pub.proxy_arp=1",
            "net.ipv4.neigh.pub.proxy_delay=0",
            "net.ipv6.conf.all.forwarding=1",
        ):
            sh(nsexec(node.ns, ["sysctl", "-qw", key]))
        if self.ipv6:
            node.ipv6 = f"{V6}::1"
            _addr6(node.ns, f"{node.ipv6}/64", "pub")

    def _start_miniupnpd(self, node: Node) -> None:
        """Debian's miniupnpd in the router, in the foreground of a process of its own
        (killed with the namespace)."""
        if not Path(MINIUPNPD).exists():
            raise LabError("port mapping needs miniupnpd (apt-get install miniupnpd-nftables)")
        assert node.lan_net is not None
        state = STATE_DIR / f"{node.ns}"
        state.mkdir(parents=True, exist_ok=True)
        conf = state / "miniupnpd.conf"
        assert node.profile is not None
        conf.write_text(miniupnpd_config(node.lan_net, str(state), node.profile.portmap))
        (state / "leases").touch()
        sh(nsexec(node.ns, ["nft", "-f", "-"]), input=miniupnpd_ruleset())
        log = open(state / "miniupnpd.log", "w")  # noqa: SIM115 - the daemon's, kept open for it
        subprocess.Popen(
            nsexec(node.ns, [MINIUPNPD, "-d", "-f", str(conf), "-P", str(state / "pid")]),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 5
        while "HTTP listening on port" not in (state / "miniupnpd.log").read_text():
            if time.monotonic() > deadline:
                raise LabError(f"miniupnpd did not start: {(state / 'miniupnpd.log').read_text()[-500:]}")
            time.sleep(0.05)

    def _plug_wan(self, node: Node, wan_ip: str) -> None:
        """The router's WAN: on the public segment, or a link of its own to the hop."""
        if self.hop is None:
            self._plug_public(node, "wan")
            ip(node.ns, "addr", "add", f"{wan_ip}/24", "dev", "wan")
            return
        gateway = self.hop.ip
        ip(self.hop.ns, "link", "add", node.name, "type", "veth", "peer", "name", "wan", "netns", node.ns)
        ip(self.hop.ns, "addr", "add", f"{gateway}/32", "dev", node.name)
        ip(self.hop.ns, "link", "set", node.name, "up")
        ip(self.hop.ns, "route", "add", f"{wan_ip}/32", "dev", node.name)
        ip(node.ns, "link", "set", "wan", "up")
        ip(node.ns, "addr", "add", f"{wan_ip}/32", "dev", "wan")
        ip(node.ns, "route", "add", f"{gateway}/32", "dev", "wan")
        ip(node.ns, "route", "add", "default", "via", gateway, "dev", "wan")
        if self.ipv6:
            self._wan6(node)

    def _wan6(self, node: Node) -> None:
        """The router's IPv6: a /64 on its WAN link to the hop, a /64 routed to its LAN, and
        a stateful firewall instead of NAT."""
        assert self.hop is not None and node.lan_net is not None
        i = int(node.lan_net.split(".")[2])
        link = f"{V6}:ff:{i}"
        _addr6(self.hop.ns, f"{link}::1/64", node.name)
        _addr6(node.ns, f"{link}::2/64", "wan")
        ip(self.hop.ns, "-6", "route", "add", f"{V6}:{i}::/64", "via", f"{link}::2")
        ip(node.ns, "-6", "route", "add", "default", "via", f"{link}::1")
        node.ipv6 = f"{V6}:{i}::1"
        sh(nsexec(node.ns, ["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]))
        sh(nsexec(node.ns, ["nft", "-f", "-"]), input=firewall6())

    def add_nat(
        self, name: str, profile: NatProfile, behind: str | None = None, carrier: bool = False
    ) -> Node:
        """A NAT router with an empty LAN behind it; its WAN on the Internet, or with
        ``behind`` on that router's LAN (a home NAT behind a carrier's: NAT444).
        ``carrier``: its LAN is RFC 6598 shared space (100.64.N.0/24), as a CGNAT's."""
        if profile.kind == "none":
            raise LabError("profile 'none' is a public host: use add_public")
        if profile.portmap and self.hop is None and behind is None:
            raise LabError("a port-mapping router needs the hop (its WAN address is not on the segment)")
        outer = self.nodes.get(behind) if behind else None
        if behind and (outer is None or outer.kind != "router"):
            raise LabError(f"no router named {behind!r}")
        node = self._new_node(name, "router")
        if outer is not None:
            wan_ip = self._lan_address(outer)
        else:
            wan_ip = f"{PORTMAP_NET if profile.portmap else PUBLIC_NET}.{self._next_wan}"
            self._next_wan += 1
        lan_net = f"{'100.64' if carrier else '10.0'}.{self._next_lan}"
        self._next_lan += 1
        node.addresses = [wan_ip, f"{lan_net}.1"]
        node.profile = profile
        node.router = behind
        node.lan_net = f"{lan_net}.0/24"
        if outer is not None:
            self._plug_lan(outer, node, "wan", wan_ip)
        else:
            self._plug_wan(node, wan_ip)
        ip(node.ns, "link", "add", "lan", "type", "bridge")
        ip(node.ns, "addr", "add", f"{lan_net}.1/24", "dev", "lan")
        ip(node.ns, "link", "set", "lan", "up")
        if node.ipv6:
            _addr6(node.ns, f"{node.ipv6}/64", "lan")
        sh(nsexec(node.ns, ["nft", "-f", "-"]), input=ruleset(profile, wan_ip, node.lan_net))
        # After the ruleset: conntrack's sysctls exist once NAT has loaded it.
        for key, value in sysctls(profile).items():
            sh(nsexec(node.ns, ["sysctl", "-qw", f"{key}={value}"]))
        if profile.portmap:
            self._start_miniupnpd(node)
        self._hosts_on[name] = 2
        return node

    def add_host(self, name: str, behind: str) -> Node:
        """A host on ``behind``'s LAN, routed through it."""
        router = self.nodes.get(behind)
        if router is None or router.kind != "router" or router.lan_net is None:
            raise LabError(f"no router named {behind!r}")
        node = self._new_node(name, "host")
        node.router = behind
        addr = self._lan_address(router)
        self._plug_lan(router, node, "eth0", addr)
        node.addresses = [addr]
        return node

    def _lan_address(self, router: Node) -> str:
        assert router.lan_net is not None
        n = self._hosts_on[router.name]
        self._hosts_on[router.name] = n + 1
        return router.lan_net.rsplit(".", 1)[0] + f".{n}"

    def _plug_lan(self, router: Node, node: Node, ifname: str, addr: str) -> None:
        """``node`` on ``router``'s LAN bridge (interface ``ifname``), routed through it."""
        ip(router.ns, "link", "add", node.name, "type", "veth", "peer", "name", ifname, "netns", node.ns)
        ip(router.ns, "link", "set", node.name, "master", "lan")
        if router.profile is not None and router.profile.hairpin:
            # A hairpinned packet from a host back to itself leaves the router
            # through the bridge port it came in on; a Linux bridge drops such
            # frames unless the port is in hairpin mode.
            ip(router.ns, "link", "set", "dev", node.name, "type", "bridge_slave", "hairpin", "on")
        ip(router.ns, "link", "set", node.name, "up")
        ip(node.ns, "addr", "add", f"{addr}/24", "dev", ifname)
        ip(node.ns, "link", "set", ifname, "up")
        ip(node.ns, "route", "add", "default", "via", router.addresses[1])
        if router.ipv6 and node.kind == "host":
            node.ipv6 = router.ipv6.rsplit("::", 1)[0] + f"::{addr.rsplit('.', 1)[1]}"
            _addr6(node.ns, f"{node.ipv6}/64", ifname)
            ip(node.ns, "-6", "route", "add", "default", "via", router.ipv6)

    # -- using ----------------------------------------------------------------
    def cmd(self, node: str, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside ``node``'s namespace."""
        return nsexec(self.nodes[node].ns, argv)

    def run(self, node: str, argv: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.cmd(node, argv), capture_output=True, text=True, timeout=timeout)

    def popen(self, node: str, argv: Sequence[str], **kw: object) -> subprocess.Popen[str]:
        return subprocess.Popen(self.cmd(node, argv), text=True, **kw)  # type: ignore[call-overload]

    def flush_conntrack(self, router: str, udp_only: bool = False) -> None:
        """Forget every NAT binding on ``router`` (as a reboot would), or only the UDP ones
        (as a UDP binding timeout would: TCP connections through it survive)."""
        argv = ["conntrack", "-D", "-p", "udp"] if udp_only else ["conntrack", "-F"]
        sh(nsexec(self.nodes[router].ns, argv), check=False)
        sh(nsexec(self.nodes[router].ns, ["nft", "flush", "map", "ip", "natlab", "ports"]), check=False)
        sh(nsexec(self.nodes[router].ns, ["nft", "flush", "map", "ip", "natlab", "peers"]), check=False)

    # -- lifecycle ------------------------------------------------------------
    def down(self) -> None:
        """Remove every namespace this topology made (processes inside are killed)."""
        for ns in reversed(self._created):
            netns.delete_namespace(ns)
            shutil.rmtree(STATE_DIR / ns, ignore_errors=True)
        self._created.clear()
        (STATE_DIR / f"{self.prefix}.json").unlink(missing_ok=True)

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def describe(self) -> dict[str, object]:
        return {
            "prefix": self.prefix,
            "hop": self.hop is not None,
            "ipv6": self.ipv6,
            "nodes": {
                n.name: {
                    "ns": n.ns,
                    "kind": n.kind,
                    "addresses": n.addresses,
                    "router": n.router,
                    "profile": n.profile.as_dict() if n.profile else None,
                    "lan_net": n.lan_net,
                    "ipv6": n.ipv6,
                }
                for n in self.nodes.values()
            },
        }

    def save(self) -> Path:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        path = STATE_DIR / f"{self.prefix}.json"
        path.write_text(json.dumps(self.describe(), indent=2))
        return path

    @classmethod
    def load(cls, prefix: str) -> Topology:
        """A handle on a topology made by an earlier ``natlab up``."""
        path = STATE_DIR / f"{prefix}.json"
        if not path.exists():
            raise LabError(f"no topology {prefix!r} (see `natlab list`)")
        data = json.loads(path.read_text())
        topo = cls.__new__(cls)
        topo.prefix = prefix
        topo.inet = f"{prefix}-inet"
        topo.nodes = {}
        for name, d in data["nodes"].items():
            prof = NatProfile(**d["profile"]) if d["profile"] else None
            topo.nodes[name] = Node(
                name, d["ns"], d["kind"], d["addresses"], d["router"], prof, d["lan_net"], d.get("ipv6")
            )
        topo.hop = topo.nodes.get("hop") if data.get("hop") else None
        topo.ipv6 = bool(data.get("ipv6"))
        topo._created = [topo.inet] + [n.ns for n in topo.nodes.values()]
        return topo


def _addr6(ns: str, cidr: str, dev: str) -> None:
    """An IPv6 address usable at once (no duplicate address detection: nobody else is here)."""
    ip(ns, "-6", "addr", "add", cidr, "dev", dev, "nodad")


def firewall6() -> str:
    """A home router's IPv6 firewall (RFC 6092 simple security): inbound only what answers
    something sent from inside, per address and port (conntrack)."""
    return """table ip6 natlab6 {
  chain forward {
    type filter hook forward priority filter; policy accept;
    ct state established,related accept
    iifname "wan" drop
  }
}
"""


def nat444(
    prefix: str | None,
    home: Sequence[NatProfile],
    carrier: NatProfile,
    same_carrier: bool = True,
    hop: bool = True,
) -> Topology:
    """Carrier-grade NAT (NAT444): home NATs ``nat<i>`` (hosts ``h<i>``) whose WANs are on
    a carrier NAT's shared-space LAN (100.64.0.0/10). With ``same_carrier``, all behind one
    ``cgn``; else ``h1``'s home NAT behind ``cgn`` and every other home NAT on the Internet
    directly (one side NAT444, the other a plain home NAT)."""
    topo = Topology(prefix, hop=hop)
    try:
        topo.add_public("rdv", [f"{PUBLIC_NET}.10", f"{PUBLIC_NET}.11"])
        topo.add_nat("cgn", carrier, carrier=True)
        for i, prof in enumerate(home, 1):
            topo.add_nat(f"nat{i}", prof, behind="cgn" if same_carrier or i == 1 else None)
            topo.add_host(f"h{i}", f"nat{i}")
    except Exception:
        topo.down()
        raise
    return topo


def down_all() -> list[str]:
    """Remove every natlab namespace on this machine (leftovers of crashed runs)."""
    gone = [ns for ns in netns.namespaces() if ns.startswith(netns.TAG)]
    # Hosts and routers first, the public bridge last.
    for ns in sorted(gone, key=lambda n: n.endswith("-inet")):
        netns.delete_namespace(ns)
    if STATE_DIR.exists():
        for f in STATE_DIR.glob(f"{netns.TAG}*"):
            if f.is_dir():
                shutil.rmtree(f, ignore_errors=True)
            else:
                f.unlink(missing_ok=True)
    return gone


def standard(
    prefix: str | None,
    profiles: Sequence[NatProfile],
    hosts_per_nat: int = 1,
    hop: bool = False,
    ipv6: bool = False,
) -> Topology:
    """The rendezvous on two public addresses plus one NAT (or public host) per profile.

    Node names: ``rdv``; for profile i (1-based) a router ``nat<i>`` with hosts
    ``h<i>``, ``h<i>b``, ...; for profile "none" a public host ``h<i>``.
    """
    topo = Topology(prefix, hop=hop or any(p.portmap for p in profiles), ipv6=ipv6)
    try:
        topo.add_public("rdv", [f"{PUBLIC_NET}.10", f"{PUBLIC_NET}.11"])
        for i, prof in enumerate(profiles, 1):
            if prof.kind == "none":
                topo.add_public(f"h{i}")
                continue
            topo.add_nat(f"nat{i}", prof)
            for k in range(hosts_per_nat):
                topo.add_host(f"h{i}" + ("" if k == 0 else chr(ord("a") + k)), f"nat{i}")
    except Exception:
        topo.down()
        raise
    return topo
