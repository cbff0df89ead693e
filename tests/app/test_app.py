"""`p2pim app` in a real browser (Debian's chromium, headless, driven by selenium) against a
real `rendezvous serve` on loopback: messages both ways appear once, marks go from sent to
delivered to read, a file dropped on the composer arrives whole with its progress at 100%,
a group message reaches three members, a key change shows the warning with both
fingerprints and a trust button; and the guard: no token, a foreign Host, a foreign Origin
are refused. Screenshots of each screen go to the test's directory (and to
docs/screenshots with P2PIM_SAVE_SCREENSHOTS=1)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from p2pim.client import Client
from p2pim.profile import Profile

from ..conftest import RendezvousProcess, free_udp_ports, tool
from ..integration.chatutil import PASSWORD, befriend, new_user

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
FILE_SIZE = 300_000


class App:
    """A `p2pim app --no-browser` process for one profile; ``url`` is what it printed."""

    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [tool("p2pim"), "app", "--no-browser", "--json", "--profile", name],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(
                f"p2pim app did not start: {self.proc.stderr.read() if self.proc.stderr else ''}"
            )
        self.url: str = json.loads(line)["url"]
        self.port = int(self.url.split(":")[2].split("/")[0])
        self.token = self.url.split("t=", 1)[1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def browser() -> WebDriver:
    opts = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,720",
                "--disable-dev-shm-usage", "--no-first-run"):  # fmt: skip
        opts.add_argument(arg)
    assert CHROMIUM and DRIVER, "chromium and chromium-driver (Debian) are needed"
    opts.binary_location = CHROMIUM
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def until(probe: Callable[[], Any], timeout: float = 20.0, what: str = "the page") -> Any:
    end = time.monotonic() + timeout
    while True:
        try:
            got = probe()
        except Exception:  # the element is not there yet, or was redrawn
            got = None
        if got:
            return got
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def click(driver: WebDriver, css: str, what: str) -> None:
    """Click what ``css`` finds, again if the page redrew it meanwhile (lists are redrawn)."""

    def once() -> bool:
        driver.find_element(By.CSS_SELECTOR, css).click()
        return True

    until(once, what=what)


def read(driver: WebDriver, css: str, what: str, attr: str = "") -> str:
    """The text (or ``attr``) of what ``css`` finds, once there is some."""

    def once() -> str | None:
        e = driver.find_element(By.CSS_SELECTOR, css)
        return e.get_attribute(attr) if attr else e.text

    return str(until(once, what=what))


def shot(driver: WebDriver, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(out / f"{name}.png"))
    if os.environ.get("P2PIM_SAVE_SCREENSHOTS"):
        docs = ROOT / "docs" / "screenshots"
        docs.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / f"{name}.png", docs / f"{name}.png")


def texts(driver: WebDriver) -> list[str]:
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#messages li .text")]


def open_peer(driver: WebDriver, peer: str) -> None:
    click(driver, f'li[data-peer="{peer}"]', f"{peer} in the list")
    until(lambda: driver.find_element(By.ID, "composer").is_displayed(), what="the composer")


def say(driver: WebDriver, text: str) -> None:
    box = driver.find_element(By.ID, "text")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[RendezvousProcess, dict[str, str], Path]]:
    stun, alt = free_udp_ports(2)
    srv = RendezvousProcess(
        tmp_path / "server.db",
        ("--heartbeat", "2", "--stun-ip", "127.0.0.1", "--stun-port", str(stun), "--stun-alt-port", str(alt)),
    )
    home = tmp_path / "xdg"
    env = dict(
        os.environ,
        XDG_DATA_HOME=str(home),
        XDG_DOWNLOAD_DIR=str(tmp_path / "downloads"),
        P2PIM_NO_PORT_MAPPING="1",
    )

    async def setup() -> None:
        users = {n: await new_user(srv.url, home / "p2pim", n) for n in ("alice", "bob", "carol", "dave")}
        for n in ("bob", "carol", "dave"):
            await befriend(users["alice"], users[n])
        for c in users.values():
            await c.close()

    asyncio.run(setup())
    yield srv, env, home
    srv.stop()


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver")
def test_two_apps_in_a_real_browser(
    world: tuple[RendezvousProcess, dict[str, str], Path], tmp_path: Path
) -> None:
    srv, env, home = world
    out = tmp_path / "screens"
    apps = {n: App(n, env) for n in ("alice", "bob", "carol")}
    pages = {n: browser() for n in apps}
    try:
        for n, app in apps.items():
            pages[n].get(app.url)
        a, b, c = pages["alice"], pages["bob"], pages["carol"]
        until(lambda: a.find_element(By.ID, "conn").text == "connected", what="alice connected")

        # alice writes; bob (not looking yet) has it unread, then opens it: read
        open_peer(a, "bob")
        say(a, "hello bob, from the browser")
        mark = lambda: a.find_element(By.CSS_SELECTOR, "#messages li.mine .mark").get_attribute("data-state")  # noqa: E731
        assert until(lambda: mark() == "delivered", what="the delivered mark")
        assert read(b, 'li[data-peer="alice"] .unread', "bob's unread") == "1"
        shot(b, out, "buddies-unread")
        open_peer(b, "alice")
        assert until(lambda: texts(b) == ["hello bob, from the browser"], what="bob's history")
        assert until(lambda: mark() == "read", what="the read mark")
        say(b, "hi alice! 👋")
        assert until(
            lambda: texts(a) == ["hello bob, from the browser", "hi alice! 👋"], what="the reply, once"
        )
        time.sleep(0.3)  # nothing shows twice once more time has passed
        assert texts(a) == ["hello bob, from the browser", "hi alice! 👋"]
        assert texts(b) == ["hello bob, from the browser", "hi alice! 👋"]
        shot(a, out, "conversation")

        # a file dropped on alice's composer (a real drop event with a File built in the page)
        a.execute_script(
            """
            const n = arguments[0];
            const bytes = new Uint8Array(n).map((_, i) => (i * 7 + 3) & 255);
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], "notes.bin"));
            const drop = new DragEvent("drop", {dataTransfer: dt, bubbles: true});
            document.getElementById("composer").dispatchEvent(drop);
            """,
            FILE_SIZE,
        )
        until(lambda: b.find_element(By.CSS_SELECTOR, "#files li button.accept"), what="bob's offer")
        shot(b, out, "file-offer")
        click(b, "#files li button.accept", "accept")
        until(lambda: b.find_element(By.CSS_SELECTOR, "#files li .file-state").text == "done", what="done")
        where = read(b, "#files li .meta", "where the file is")
        assert read(b, "#files li .pct", "bob's 100%") == "100%"
        assert until(
            lambda: a.find_element(By.CSS_SELECTOR, "#files li .pct").text == "100%", what="alice's 100%"
        )
        # Bob's "done" comes after the last chunk's ack (100%): it lands in bob's conversation,
        # read while alice has it open. Leaving before it came would leave it unread there (as
        # it should be), and the check below would catch that race, not a bug.
        until(
            lambda: a.find_element(By.CSS_SELECTOR, "#files li .file-state").text == "done",
            what="alice's done",
        )
        expected = bytes((i * 7 + 3) & 255 for i in range(FILE_SIZE))
        assert Path(where).parent == tmp_path / "downloads"
        arrived = Path(where).read_bytes()
        assert hashlib.blake2b(arrived).digest() == hashlib.blake2b(expected).digest()
        uploads = home / "p2pim" / "profiles" / "alice" / "uploads"  # the dropped copy goes once sent
        until(lambda: not [f for f in uploads.rglob("*") if f.is_file()], what="the upload tidied away")
        shot(b, out, "file-done")

        # a group: alice makes it, bob and carol join, alice's message reaches both
        a.find_element(By.ID, "group-name").send_keys("team")
        a.find_element(By.ID, "group-members").send_keys("bob, carol")
        a.find_element(By.CSS_SELECTOR, "#new-group button").click()
        for page in (b, c):
            click(page, "#groups li", "the invitation")
            click(page, "#invite button", "join")
        peer = read(a, "#groups li", "alice's group", "data-peer")
        until(lambda: "3 members" in a.find_element(By.CSS_SELECTOR, "#groups li").text, what="three members")
        open_peer(a, str(peer))
        say(a, "team lunch at noon?")
        for page in (b, c):
            open_peer(page, str(peer))
            assert until(lambda p=page: texts(p) == ["team lunch at noon?"], what="the group message")
        shot(c, out, "group")

        # dave loses every device: alice's window warns, with both fingerprints, and can trust
        async def new_key() -> None:
            dave = Client(srv.url, Profile("dave-new", home / "p2pim" / "profiles"))
            await dave.connect()
            await dave.login("dave", PASSWORD, new_key=True)
            await dave.close()

        asyncio.run(new_key())
        until(lambda: a.find_element(By.CSS_SELECTOR, 'li[data-peer="dave"] .warn'), what="dave's key badge")
        open_peer(a, "dave")
        warning = read(a, '#warning[data-key-warning="dave"]', "the warning")
        assert "key changed" in warning and "trust" in warning.lower()
        pinned, offered = (line.split(": ", 1)[1] for line in warning.splitlines()[1:3])
        assert pinned != offered and len(offered.split()) == 8  # both fingerprints, to compare
        shot(a, out, "key-changed")
        click(a, "#trust", "trust")
        until(lambda: not a.find_elements(By.CSS_SELECTOR, 'li[data-peer="dave"] .warn'), what="trusted")
        assert not a.find_elements(By.CSS_SELECTOR, "#buddies .unread")  # what was shown is read

        a.find_element(By.ID, "tab-devices").click()
        until(lambda: "(this one)" in a.find_element(By.ID, "device-list").text, what="the devices screen")
        shot(a, out, "devices")
        a.find_element(By.ID, "tab-nat").click()
        a.find_element(By.ID, "nat-run").click()
        table = until(lambda: a.find_element(By.ID, "nat-table").text, 30, "the NAT diagnosis")
        assert "NAT type" in table and "Mapped address" in table  # p2pim nat's own table
        assert a.find_elements(By.CSS_SELECTOR, "#nat-picture svg rect")  # and the picture
        assert ":" in a.find_element(By.ID, "nat-advice").text
        shot(a, out, "nat")
        a.set_window_size(420, 760)  # a narrow window stacks the columns
        a.find_element(By.ID, "tab-chats").click()
        shot(a, out, "narrow")
    finally:
        for page in pages.values():
            page.quit()
        for app in apps.values():
            app.stop()
    for n in ("alice", "bob", "carol"):
        assert sorted(p.name for p in out.glob("*.png")), n


def test_only_the_page_with_the_token_may_drive_the_app(
    world: tuple[RendezvousProcess, dict[str, str], Path],
) -> None:
    _, env, _ = world
    app = App("alice", env)
    try:
        base = f"http://127.0.0.1:{app.port}"

        def get(path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
            req = urllib.request.Request(base + path, headers=headers or {})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    return r.status, dict(r.headers), r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, dict(e.headers), e.read().decode()

        status, headers, page = get(f"/?t={app.token}")
        assert status == 200 and "p2pim" in page and "Access-Control-Allow-Origin" not in headers
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        assert get("/")[0] == 403  # no token
        assert get("/?t=" + "x" * len(app.token))[0] == 403  # a wrong one
        assert get("/ws")[0] == 403
        rebound = get(f"/?t={app.token}", {"Host": f"evil.example:{app.port}"})  # DNS rebinding
        assert rebound[0] == 421
        upload = urllib.request.Request(base + "/upload?to=bob", data=b"x", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(upload, timeout=10)
        assert refused.value.code == 403

        async def sockets() -> None:
            url = f"ws://127.0.0.1:{app.port}/ws?t={app.token}"
            with pytest.raises(InvalidStatus) as foreign:
                async with ws_connect(url, origin="http://evil.example"):  # type: ignore[arg-type]
                    pass
            assert foreign.value.response.status_code == 403
            async with ws_connect(url, origin=f"http://127.0.0.1:{app.port}") as ws:  # type: ignore[arg-type]
                await ws.send(json.dumps({"id": 1, "op": "state"}))
                answer = json.loads(await ws.recv())
                while answer.get("id") != 1:
                    answer = json.loads(await ws.recv())
                assert answer["ok"]["me"] == "alice"
                await ws.send("not json")  # garbage is answered, the page's loop carries on
                await ws.send(json.dumps({"id": 2, "op": "no-such-op"}))
                seen = [json.loads(await ws.recv()) for _ in range(2)]
                assert any(s.get("error") == "not a JSON request" for s in seen)
                assert any(s.get("id") == 2 and "no such request" in s.get("error", "") for s in seen)

        asyncio.run(sockets())
        # one long-lived session per profile: listen will not start beside the app
        listen = subprocess.run(
            [tool("p2pim"), "listen", "--profile", "alice"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert listen.returncode == 2 and "p2pim app runs on profile alice" in listen.stderr
    finally:
        app.stop()
