"""QUIC links between two cores in memory on a fake clock: the handshake with certificates
made from identity keys, frames both ways, and every way a stranger is kept out."""

from __future__ import annotations

from p2pim.identity import Identity
from p2pim.quic.links import FrameIn, LinkDown, LinkUp, QuicLinks

A_ADDR, B_ADDR = ("10.0.0.1", 1111), ("10.0.0.2", 2222)


class Side:
    def __init__(self, name: str, ident: Identity, addr: tuple[str, int]) -> None:
        self.name, self.ident, self.addr = name, ident, addr
        self.pinned: dict[str, bytes] = {}
        self.counters: dict[str, int] = {}
        self.links = QuicLinks(ident, self.pinned.get, self.counters)
        self.events: list[object] = []


def pair() -> tuple[Side, Side]:
    a, b = Side("alice", Identity.generate(), A_ADDR), Side("bob", Identity.generate(), B_ADDR)
    a.pinned["bob"], b.pinned["alice"] = b.ident.public_key, a.ident.public_key
    return a, b


def pump(a: Side, b: Side, now: float = 0.0, rounds: int = 50, tamper=None) -> float:
    """Move datagrams between the two until both are quiet."""
    by_addr = {a.addr: a, b.addr: b}
    for _ in range(rounds):
        moved = False
        for src in (a, b):
            for dg in src.links.datagrams_to_send(now):
                moved = True
                data = tamper(dg.data) if tamper else dg.data
                if dg.addr in by_addr:  # else: to an address nobody has any more (dropped)
                    by_addr[dg.addr].links.receive_datagram("main", data, src.addr, now)
            while (ev := src.links.next_event()) is not None:
                src.events.append(ev)
        if not moved:
            now += 0.01
            for side in (a, b):
                t = side.links.get_timer()
                if t is not None and t <= now:
                    side.links.handle_timer(now)
    for side in (a, b):
        while (ev := side.links.next_event()) is not None:
            side.events.append(ev)
    return now


def connect(a: Side, b: Side) -> float:
    a.links.path("bob", "main", B_ADDR, 0.0)
    b.links.path("alice", "main", A_ADDR, 0.0)
    return pump(a, b)


def test_buddies_link_up_and_frames_go_both_ways_in_order() -> None:
    a, b = pair()
    now = connect(a, b)
    assert LinkUp("bob") in a.events and LinkUp("alice") in b.events
    big = bytes(range(256)) * 800  # 200 KiB: many packets
    for i in range(20):
        assert a.links.send("bob", b"a%d" % i)
    assert b.links.send("alice", big)
    pump(a, b, now, rounds=400)
    assert [e.data for e in b.events if isinstance(e, FrameIn)] == [b"a%d" % i for i in range(20)]
    assert [e.data for e in a.events if isinstance(e, FrameIn)] == [big]
    assert a.counters["quic_links"] + b.counters["quic_links"] == 2  # one link, not two


def test_a_server_whose_key_is_not_the_pinned_one_is_refused() -> None:
    a, b = pair()
    low = min(a.ident.public_key, b.ident.public_key)
    impostor = Identity.generate()
    while impostor.public_key < low:  # the client must still see itself as the client
        impostor = Identity.generate()
    if a.ident.public_key < b.ident.public_key:  # alice is the client: bob's key must match
        a.pinned["bob"] = impostor.public_key
        client, server_name = a, "bob"
    else:
        b.pinned["alice"] = impostor.public_key
        client, server_name = b, "alice"
    connect(a, b)
    assert not any(isinstance(e, LinkUp) for e in client.events)
    assert client.counters["quic_bad"] == 1
    assert not client.links.up(server_name)


def test_a_client_that_cannot_sign_for_its_pinned_key_is_refused() -> None:
    a, b = pair()
    server = b if a.ident.public_key < b.ident.public_key else a
    other = "alice" if server is b else "bob"
    server.pinned[other] = Identity.generate().public_key  # the server expects another key
    # ... whose holder would be the server's client only if it sorts below the server's key
    if not server.pinned[other] < server.ident.public_key:
        server.pinned[other] = bytes([0]) + server.pinned[other][1:]
    connect(a, b)
    assert not server.links.up(other)


def test_packets_from_an_address_that_is_no_buddys_path_open_nothing() -> None:
    a, b = pair()
    client, server = (a, b) if a.ident.public_key < b.ident.public_key else (b, a)
    peer_of_client = "bob" if client is a else "alice"
    client.links.path(peer_of_client, "main", server.addr, 0.0)  # the server was told nothing
    pump(a, b, rounds=20)
    assert server.counters["quic_refused"] >= 1 and server.counters["quic_links"] == 0
    server.links.receive_datagram("main", b"\xc0" + b"\x00" * 1300, ("6.6.6.6", 6), 0.0)
    server.links.receive_datagram("main", b"\x40junk", ("6.6.6.6", 6), 0.0)
    assert server.counters["quic_links"] == 0


def test_the_link_goes_down_when_the_path_does() -> None:
    a, b = pair()
    now = connect(a, b)
    a.links.path("bob", "main", None, now)
    pump(a, b, now)
    assert LinkDown("bob", "no direct path") in a.events
    assert not a.links.up("bob") and not a.links.send("bob", b"x")
    assert any(isinstance(e, LinkDown) for e in b.events)  # told by CONNECTION_CLOSE


def test_the_link_follows_a_path_that_moved_to_a_new_port() -> None:
    """The client's NAT forgot its mapping and gave it a new port: the server's disco finds
    the new path, and the QUIC connection goes on there (no new handshake, nothing lost)."""
    a, b = pair()
    now = connect(a, b)
    client, server = (a, b) if a.ident.public_key < b.ident.public_key else (b, a)
    client.addr = (client.addr[0], 4444)  # every packet of the client's now comes from here
    server.links.path(client.name, "main", client.addr, now)  # the server's disco proved it
    for i in range(5):
        assert client.links.send(server.name, b"after %d" % i)
    pump(a, b, now, rounds=100)
    assert [e.data for e in server.events if isinstance(e, FrameIn)] == [b"after %d" % i for i in range(5)]
    assert server.counters["quic_moved"] == 1 and server.counters["quic_links"] == 1
    assert not any(isinstance(e, LinkDown) for e in a.events + b.events)


def test_a_peer_that_restarted_gets_a_new_link_even_where_the_old_one_moved() -> None:
    """bob's process died and came back on a new port: alice's old link moved there with
    the path, and the new process's new connection must replace it, not be swallowed."""
    a, b = pair()
    now = connect(a, b)
    fresh = Side("bob", b.ident, ("10.0.0.2", 5555))  # the restarted bob: same key, new port
    fresh.pinned["alice"] = a.ident.public_key
    a.links.path("bob", "main", fresh.addr, now)  # alice's disco found bob's new path
    fresh.links.path("alice", "main", a.addr, now)
    pump(a, fresh, now, rounds=200)
    assert a.links.up("bob") and fresh.links.up("alice")
    assert a.links.send("bob", b"hello again")
    pump(a, fresh, now + 1, rounds=100)
    assert [e.data for e in fresh.events if isinstance(e, FrameIn)] == [b"hello again"]
