"""A real browser for the dashboard tests: the machine's Chromium driven by Playwright.

Playwright's own browser download is not used (and not reachable on CI machines); the Chromium installed
from the system's packages is. Without one the tests skip, unless LLMOS_REQUIRE_BROWSER=1 (CI sets it),
where a missing browser fails them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Without the background-networking flags Chromium keeps dialling Google's hosts, which an offline
# machine refuses; --no-sandbox because CI runs as root.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def chromium_path() -> str | None:
    configured = os.environ.get("LLMOS_CHROMIUM")
    if configured:
        return configured
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    path = chromium_path()
    if path is None:
        message = "no Chromium found (apt-get install chromium, or set LLMOS_CHROMIUM)"
        if os.environ.get("LLMOS_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=path, args=ARGS)
        yield instance
        instance.close()


class Console:
    """Errors the page logged or threw; a dashboard test ends by asserting there were none."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.refused: list[str] = []  # answers of 400 and above, to tell which request a console error means

    def attach(self, page: Any) -> None:
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))
        page.on("console", self._console)
        page.on("response", self._response)

    def _response(self, response: Any) -> None:
        if response.status >= 400:
            self.refused.append(f"{response.status} {response.request.method} {response.url}")

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text}")


@dataclass
class UI:
    page: Any
    console: Console
    base: str

    def open(self, fragment: str = "") -> None:
        self.page.goto(f"{self.base}/dashboard{fragment}")

    def sign_in(self, key: str, fragment: str = "#/jobs") -> None:
        self.open(fragment)
        self.page.get_by_test_id("api-key-input").fill(key)
        self.page.get_by_test_id("api-key-submit").click()

    def assert_no_errors(self, allow: tuple[str, ...] = ()) -> None:
        errors = [e for e in self.console.errors if not any(a in e for a in allow)]
        assert not errors, (errors, self.console.refused)


@pytest.fixture
def ui(browser: Any, api_url: str) -> Iterator[UI]:
    """A fresh browser context (its own session storage) and page, 1366 by 800 like a laptop screen."""
    context = browser.new_context(viewport={"width": 1366, "height": 800})
    context.set_default_timeout(30_000)
    page = context.new_page()
    console = Console()
    console.attach(page)
    yield UI(page, console, api_url)
    context.close()
