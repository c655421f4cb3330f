"""The dashboard in a real browser (Debian's chromium through chromium-driver): signing in
with the token, creating and attaching a volume, a data server killed and the volume turning
degraded while the rebuild's progress moves, the event list updating without a reload, a
read-only token seeing no buttons, and deleting with confirmation. A failing test leaves a
screenshot (its path is in the failure message)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LiveWriter, Node, needs_root, tcp_node

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [needs_root(), pytest.mark.system,
              pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                                 reason="needs Debian's chromium and chromium-driver")]

ADMIN = "admin-secret-0123456789"
READER = "reader-secret-0123456789"
MIB = 1 << 20


class Browser:
    """One headless chromium session on the node's dashboard."""

    def __init__(self, url: str, shots: Path) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1440,900", "--disable-gpu",
                     # the node's certificate is of the cluster's own CA
                     "--ignore-certificate-errors"):
            options.add_argument(flag)
        self.driver = webdriver.Chrome(options=options, service=Service(str(DRIVER)))
        self.url = url
        self.shots = shots

    def open(self) -> None:
        self.driver.get(self.url)

    def css(self, selector: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, selector))

    def one(self, selector: str, timeout: float = 30.0) -> Any:
        return self.until(lambda: next((e for e in self.css(selector) if e.is_displayed()),
                                       None), f"a visible {selector}", timeout)

    def until(self, check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
        from selenium.common.exceptions import StaleElementReferenceException

        deadline = time.monotonic() + timeout
        while True:
            try:
                found = check()
            except StaleElementReferenceException:  # re-rendered meanwhile: look again
                found = None
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} in {timeout} s (screenshot: "
                                     f"{self.screenshot(what)})")
            time.sleep(0.2)

    def click(self, selector: str, text: str, timeout: float = 30.0) -> None:
        """Click the visible ``selector`` element reading ``text``; the tables are drawn
        anew every 2 s, so an element found may be gone before the click: look again."""
        from selenium.common.exceptions import StaleElementReferenceException

        def clicked() -> bool:
            for element in self.css(selector):
                if element.is_displayed() and element.text == text:
                    try:
                        element.click()
                    except StaleElementReferenceException:
                        return False
                    return True
            return False

        self.until(clicked, f"{text!r} to click in {selector}", timeout)

    def text(self, selector: str) -> str:
        return " ".join(e.text for e in self.css(selector))

    def sign_in(self, token: str) -> None:
        self.one("#token").send_keys(token)
        self.one("#login-form button[type=submit]").click()
        self.one("#volumes")

    def screenshot(self, what: str) -> Path:
        self.shots.mkdir(parents=True, exist_ok=True)
        slug = "".join(c if c.isalnum() else "-" for c in what)[:60]
        path = self.shots / f"{int(time.time() * 1000)}-{slug}.png"
        self.driver.save_screenshot(str(path))
        return path

    def quit(self) -> None:
        self.driver.quit()


@pytest.fixture
def dashboard(tmp_path: Path, request: pytest.FixtureRequest
              ) -> Iterator[tuple[Node, Callable[[], Browser]]]:
    # resyncs at 4 MiB/s: slow enough to watch the progress move
    node, port = tcp_node(tmp_path, f"ops admin {ADMIN}\nviewer read-only {READER}\n",
                          "--rebuild-rate", "4M")
    browsers: list[Browser] = []
    shots = Path(os.environ.get("CARGOHOLD_SCREENSHOTS", tmp_path / "screenshots"))

    def browser() -> Browser:
        b = Browser(f"https://127.0.0.1:{port}/ui", shots / request.node.name)
        browsers.append(b)
        return b

    try:
        node.start()
        yield node, browser
    except BaseException:
        for b in browsers:
            b.screenshot("failed")
        raise
    finally:
        for b in browsers:
            b.quit()
        node.cleanup()


def test_a_volume_from_creation_through_a_lost_data_server_to_deletion(
        dashboard: tuple[Node, Callable[[], Browser]]) -> None:
    node, browser = dashboard
    ui = browser()
    try:
        ui.open()
        ui.sign_in(ADMIN)
        assert ui.one("#node-name").text == f"node {node.name}"
        assert ui.until(lambda: ui.one("#controller").text == node.name, "controller")

        # create one in the UI and see it listed
        ui.one("#new-volume").click()
        form = ui.one("#create-form")
        form.find_element("name", "name").send_keys("web")
        size = form.find_element("name", "size")
        size.clear()
        size.send_keys("256M")
        ui.one("#create-form button[value=ok]").click()
        row = 'tr[data-volume="web"]'
        ui.one(row)
        assert ui.until(lambda: ui.text(f"{row} [data-field=health]") == "healthy", "healthy")
        assert node.json("volume", "inspect", "web")["replica_count"] == 2  # type: ignore[index]

        # bad input: a clear error in the dialog, nothing created
        ui.one("#new-volume").click()
        ui.one("#create-form").find_element("name", "name").send_keys("web2")
        bad = ui.one("#create-form").find_element("name", "size")
        bad.clear()
        bad.send_keys("lots")
        ui.one("#create-form button[value=ok]").click()
        assert "size" in ui.one("#create-form .error").text.lower()
        ui.one("#create-form button[value=cancel]").click()
        assert [v["name"] for v in node.json("volume", "ls")] == ["web"]  # type: ignore[attr-defined,index]

        # attach from the UI: the event list shows it without a reload
        ui.click(f"{row} button", "Attach")
        assert ui.until(lambda: ui.text(f"{row} [data-field=state]") == "attached", "attached")
        ui.until(lambda: "web" in ui.text("#events li[data-event=attached]"),
                 "an attached event")

        # writes show as I/O; then a data server dies while writes go on
        mountpoint = Path(str(node.json("volume", "inspect", "web")["attachment"]  # type: ignore[index]
                              ["mountpoint"]))
        with LiveWriter(mountpoint / "live"):  # fsync'd 4 KiB writes: live IOPS
            ui.until(lambda: _iops(ui.text(f"{row} [data-field=iops]")) > 0, "IOPS of web")
            ui.until(lambda: _iops(ui.one("#count-iops").text) > 0, "IOPS in the tile")
        _write(mountpoint / "a", 8 * MIB)
        os.kill(node.dataserver_pids()[0], 9)
        _write(mountpoint / "b", 48 * MIB)  # what the replica misses: resynced at 4 MiB/s
        ui.until(lambda: ui.text(f"{row} [data-field=health]") == "degraded", "degraded", 60)
        seen = set()

        def progress_moved() -> bool:
            for item in ui.css('.rebuild[data-volume="web"] [data-field=progress]'):
                seen.add(item.text)
            return len(seen) >= 2

        ui.until(progress_moved, "resync progress that moves", 60)
        ui.until(lambda: ui.text(f"{row} [data-field=health]") == "healthy",
                 "healthy again", 120)
        assert ui.css('.rebuild[data-volume="web"]') == []
        assert "Every replica is in sync." in ui.one("#no-rebuilds").text

        # a read-only token sees everything and no button
        viewer = browser()
        viewer.open()
        viewer.sign_in(READER)
        viewer.one(row)
        assert viewer.one("#role").text == "read-only"
        assert not any(b.is_displayed() for b in viewer.css("#new-volume, td.actions button"))

        # detach and delete, with confirmation
        ui.click(f"{row} button", "Detach")
        assert ui.until(lambda: ui.text(f"{row} [data-field=state]") == "detached", "detached")
        ui.click(f"{row} button", "Delete")
        ui.one("#ask-input").send_keys("wrong")
        ui.one("#ask-ok").click()
        assert "Type web" in ui.one("#ask-form .error").text  # not deleted
        assert ui.css(row)
        ui.one("#ask-input").clear()
        ui.one("#ask-input").send_keys("web")
        ui.one("#ask-ok").click()
        ui.until(lambda: not ui.css(row), "the row gone")
        assert node.json("volume", "ls") == []
    except AssertionError:
        raise
    except Exception as e:  # selenium's own: keep the screenshot
        raise AssertionError(f"{e} (screenshot: {ui.screenshot('error')})") from e


def _iops(text: str) -> float:
    """The dashboard's figure: "350", "1.2k", or "–" (none)."""
    text = text.strip()
    if text.endswith("k"):
        return float(text[:-1]) * 1000
    return float(text) if text.replace(".", "", 1).isdigit() else 0.0


def _write(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // MIB):
            f.write(os.urandom(MIB))
        f.flush()
        os.fsync(f.fileno())
