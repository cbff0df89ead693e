"""`p2pim app` in natlab. On a real LAN (two hosts on one router's bridge, the rendezvous on
the public side) with `--lan`: the app lists the `p2pim lan` peer next door, and a message
goes both ways between the app's page (its WebSocket, driven from inside the host's
namespace, with the token and the app's own Origin) and the peer's `p2pim lan`. Across two
NATs: two apps, each driven by Debian's chromium inside its own host's namespace; the path
badge turns direct and a message goes each way, once."""

from __future__ import annotations

import subprocess
import sys
import tempfile

from natlab.classify import tool
from natlab.matrix import JsonProcess, profile, start_pair, stop_all
from natlab.profiles import NatProfile
from natlab.topology import new_prefix, standard
from tests.labutil import lab

pytestmark = lab

# Runs inside alice's namespace: the page's side of the WebSocket.
PAGE = r"""
import asyncio, json, sys
from websockets.asyncio.client import connect

async def main(url):
    port = url.split(":")[2].split("/")[0]
    token = url.split("t=", 1)[1]
    async with connect(f"ws://127.0.0.1:{port}/ws?t={token}", origin=f"http://127.0.0.1:{port}") as ws:
        ids = iter(range(1, 10**6))
        async def ask(op, **args):
            rid = next(ids)
            await ws.send(json.dumps({"id": rid, "op": op, **args}))
            while True:
                got = json.loads(await ws.recv())
                if got.get("id") == rid:
                    return got
                if got.get("event"):
                    print(json.dumps(got), flush=True)
        for _ in range(100):
            lan = (await ask("state"))["ok"]["lan"]
            if any(p["name"] == "bob" for p in lan):
                break
            await asyncio.sleep(0.2)
        print(json.dumps({"event": "lan_listed", "lan": lan}), flush=True)
        sent = await ask("send", to="lan:bob", text="hello bob, from the app")
        print(json.dumps({"event": "sent", **sent}), flush=True)
        async for raw in ws:
            got = json.loads(raw)
            print(json.dumps(got), flush=True)
            if got.get("event") == "message" and got.get("from") == "lan:bob":
                history = await ask("history", peer="lan:bob")
                print(json.dumps({"event": "history", **history}), flush=True)
                return

asyncio.run(main(sys.argv[1]))
"""


def test_the_app_talks_to_a_lan_peer() -> None:
    topo = standard(new_prefix(), [NatProfile("port-restricted")], hosts_per_nat=2)  # rdv; h1, h1b on nat1
    tmp = tempfile.mkdtemp(prefix="p2pim-applan-")
    procs: list[JsonProcess] = []
    server = None
    try:
        server, envs = start_pair(topo, tmp, "h1", "h1b")
        app = JsonProcess(
            topo, "h1", [tool("p2pim"), "app", "--lan", "--no-browser", "--json"], envs["alice"]
        )
        procs.append(app)
        started = app.wait(lambda e: "url" in e, 20)
        assert started is not None, "p2pim app did not start"
        url = str(next(e["url"] for _, e in app.log if "url" in e))
        bob = JsonProcess(topo, "h1b", [tool("p2pim"), "lan", "--json", "--interval", "1"], envs["bob"])
        procs.append(bob)
        assert bob.wait(lambda e: e.get("event") == "ready", 15) is not None
        page = JsonProcess(topo, "h1", [sys.executable, "-c", PAGE, url], envs["alice"])
        procs.append(page)
        listed = page.wait(lambda e: e.get("event") == "lan_listed", 30)
        assert listed is not None
        lan = next(e["lan"] for _, e in page.log if e.get("event") == "lan_listed")
        bob_row = next(p for p in lan if p["name"] == "bob")  # type: ignore[union-attr]
        assert bob_row["encrypted"] is True and bob_row["peer"] == "lan:bob"
        assert bob.wait(
            lambda e: e.get("event") == "message" and e.get("text") == "hello bob, from the app", 15
        )
        bob.type("alice: and back, over the LAN")
        assert page.wait(lambda e: e.get("event") == "history", 15) is not None
        history = next(e for _, e in page.log if e.get("event") == "history")["ok"]
        said = [(m["outgoing"], m["text"]) for m in history]  # type: ignore[index]
        assert said == [(True, "hello bob, from the app"), (False, "and back, over the LAN")], said
        came = [e for _, e in page.log if e.get("event") == "message"]
        assert len(came) == 1 and came[0].get("encrypted") is True  # once, end to end
    finally:
        stop_all(topo, procs, server)
        subprocess.run(["rm", "-rf", tmp], check=False)


# Runs inside each user's namespace: Debian's chromium (headless, driven by selenium) on
# that user's app, for the pair across two NATs.
BROWSER = r"""
import json, sys, time
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

url, peer, say, expect = sys.argv[1:]
opts = Options()
for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"):
    opts.add_argument(arg)
opts.binary_location = "/usr/bin/chromium"
d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)

def until(probe, timeout=60):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            got = probe()
            if got:
                return got
        except Exception:
            pass
        time.sleep(0.05)
    print(json.dumps({"event": "timeout", "page": d.find_element(By.TAG_NAME, "body").text}), flush=True)
    raise SystemExit(1)

def texts():
    return [e.text for e in d.find_elements(By.CSS_SELECTOR, "#messages li .text")]

try:
    d.get(url)
    until(lambda: d.find_element(By.CSS_SELECTOR, f'li[data-peer="{peer}"]').click() or True)
    badge = until(lambda: (lambda t: t if t.startswith("direct") else None)(
        d.find_element(By.CSS_SELECTOR, f'li[data-peer="{peer}"] .badge').text))
    print(json.dumps({"event": "badge", "text": badge}), flush=True)
    box = d.find_element(By.ID, "text")
    box.send_keys(say)
    box.send_keys(Keys.ENTER)
    until(lambda: expect in texts() and say in texts())
    time.sleep(1.0)  # anything shown twice would come meanwhile
    print(json.dumps({"event": "done", "texts": texts()}), flush=True)
finally:
    d.quit()
"""


def test_two_apps_across_two_nats() -> None:
    profiles = [profile("port-restricted"), profile("full-cone", side="b")]
    topo = standard(new_prefix(), profiles)  # rdv; h1 behind nat1, h2 behind nat2
    tmp = tempfile.mkdtemp(prefix="p2pim-apppair-")
    procs: list[JsonProcess] = []
    server = None
    try:
        server, envs = start_pair(topo, tmp, "h1", "h2")
        urls = {}
        for who, host in (("alice", "h1"), ("bob", "h2")):
            app = JsonProcess(topo, host, [tool("p2pim"), "app", "--no-browser", "--json"], envs[who])
            procs.append(app)
            assert app.wait(lambda e: "url" in e, 20) is not None, f"{who}'s app did not start"
            urls[who] = str(next(e["url"] for _, e in app.log if "url" in e))
        script = [sys.executable, "-c", BROWSER]
        pages = {
            "alice": JsonProcess(
                topo, "h1", [*script, urls["alice"], "bob", "hi bob", "hi alice"], envs["alice"]
            ),
            "bob": JsonProcess(
                topo, "h2", [*script, urls["bob"], "alice", "hi alice", "hi bob"], envs["bob"]
            ),
        }
        procs += list(pages.values())
        for who, page in pages.items():
            assert page.wait(lambda e: e.get("event") in ("done", "timeout"), 90) is not None, (
                f"{who}'s browser"
            )
            ended = next(e for _, e in page.log if e.get("event") in ("done", "timeout"))
            assert ended["event"] == "done", ended  # (the page's text, if it timed out)
            badge = next(e for _, e in page.log if e.get("event") == "badge")
            assert str(badge["text"]).startswith("direct 203.0.113."), badge  # across the NATs
            mine, theirs = ("hi bob", "hi alice") if who == "alice" else ("hi alice", "hi bob")
            assert sorted(ended["texts"]) == sorted([mine, theirs]), ended  # each once  # type: ignore[arg-type]
    finally:
        stop_all(topo, procs, server)
        subprocess.run(["rm", "-rf", tmp], check=False)
