"""Check a report page in headless Chromium (``check_in_browser``): console errors, undecoded images, external
references, and a full-page screenshot. Used by the study's tests; Debian's ``chromium`` package (``.ci/run``)."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from posttrain_probe.errors import ProbeError

_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
_CONSOLE_LINE = re.compile(r":CONSOLE[:(]\d+\)?\] \"(?P<message>.*)\", source: (?P<source>.*) \(\d+\)$")
_PROBE_ATTRIBUTE = "data-browser-check"
# Runs first in the page: records console.error calls, uncaught exceptions, failed loads of elements
# (img, link, script: their 'error' events, seen in the capture phase) and unhandled rejections, and
# on 'load' each image's natural size and the page height, into an attribute that --dump-dom prints.
_PROBE = (
    "<script>(function(){var r={errors:[]};var e=console.error;"
    "console.error=function(){r.errors.push('console.error: '+Array.prototype.join.call(arguments,' '));"
    "return e.apply(console,arguments)};"
    "window.addEventListener('error',function(v){var t=v.target;"
    "if(t&&t!==window&&t.tagName){r.errors.push('failed to load <'+t.tagName.toLowerCase()+'> '+"
    "String(t.currentSrc||t.src||t.href||'').slice(0,120))}else{r.errors.push('uncaught: '+v.message)}},true);"
    "window.addEventListener('unhandledrejection',function(v){r.errors.push('unhandled rejection: '+v.reason)});"
    "window.addEventListener('load',function(){r.images=Array.prototype.map.call(document.images,function(i){"
    "var b=i.getBoundingClientRect();return{width:i.naturalWidth,height:i.naturalHeight,complete:i.complete,"
    "bottom:Math.ceil(b.bottom+window.scrollY),src:String(i.currentSrc||i.src).slice(0,60)}});"
    "var d=document.documentElement;r.height=Math.ceil(Math.max(d.scrollHeight,document.body?"
    "document.body.scrollHeight:0));d.setAttribute('" + _PROBE_ATTRIBUTE + "',JSON.stringify(r))})})();</script>"
)


@dataclass
class BrowserCheck:
    """What headless Chromium saw of an HTML page (:func:`check_in_browser`)."""

    browser: str
    """The Chromium executable and its version."""
    console_errors: list[str]
    """console.error calls, uncaught exceptions, unhandled rejections and failed loads of elements."""
    console: list[str] = field(default_factory=list)
    """Every console message Chromium logged (any level), as 'message (source)'."""
    images: list[dict[str, Any]] = field(default_factory=list)
    """Per <img>: natural width and height (0 when it did not decode), complete, bottom edge (CSS px), src head."""
    page_height: int = 0
    """Height of the laid-out page (CSS px at the check's window width)."""
    screenshot: Path | None = None
    """The full-page screenshot PNG."""
    screenshot_size: tuple[int, int] = (0, 0)
    """(width, height) of the screenshot in pixels."""
    screenshot_distinct_colours: int = 0
    """Distinct colours in the screenshot (1: a blank page)."""
    external_references: list[str] = field(default_factory=list)
    """src/href/url() references that are not data: URIs or #anchors (a self-contained page has none)."""
    max_height: int = 32000
    """The tallest screenshot taken (CSS px): a longer page is captured down to here only."""

    @property
    def undecoded_images(self) -> list[dict[str, Any]]:
        """The images whose natural width or height is 0."""
        return [image for image in self.images if not (image["width"] > 0 and image["height"] > 0)]

    @property
    def images_bottom(self) -> int:
        """Bottom edge of the lowest image (CSS px; 0 without images)."""
        return max((int(image["bottom"]) for image in self.images), default=0)

    def problems(self) -> list[str]:
        """Everything wrong, one line each: console errors, undecoded images, external references, a missing,
        blank or too short screenshot. Empty when the page is fine."""
        problems = [f"console error: {e}" for e in self.console_errors]
        problems += [f"image not decoded: {image['src']}..." for image in self.undecoded_images]
        problems += [f"external reference: {ref}" for ref in self.external_references]
        if self.screenshot is None or self.screenshot_size[1] == 0:
            problems.append("no screenshot was taken")
        else:
            if self.screenshot_distinct_colours <= 1:
                problems.append(f"the screenshot {self.screenshot} is blank")
            if self.screenshot_size[1] < min(max(self.page_height, self.images_bottom), self.max_height):
                problems.append(
                    f"the screenshot is {self.screenshot_size[1]} px high, the page {self.page_height} px "
                    f"(images end at {self.images_bottom} px)"
                )
        return problems

    @property
    def ok(self) -> bool:
        """True when :meth:`problems` is empty."""
        return not self.problems()


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable: $CHROMIUM if set, else the first of chromium, chromium-browser,
    google-chrome(-stable), chrome on PATH; None when there is none."""
    given = os.environ.get("CHROMIUM")
    if given:
        return shutil.which(given) or (given if Path(given).is_file() else None)
    for name in _BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


class _References(HTMLParser):
    """Collects URL-valued attributes and CSS url(...) of a page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag, attrs) -> None:
        self._in_style = tag == "style"
        for name, value in attrs:
            if name in ("src", "href", "poster", "data", "action", "srcset", "xlink:href") and value is not None:
                self.found.append(value.strip())
            elif name == "style" and value:
                self.found += re.findall(r"url\(\s*['\"]?([^'\")]*)", value)

    def handle_endtag(self, tag) -> None:
        self._in_style = False

    def handle_data(self, data) -> None:
        if self._in_style:
            self.found += re.findall(r"url\(\s*['\"]?([^'\")]*)", data) + re.findall(r"@import\s+['\"]([^'\"]+)", data)


def external_references(page: str) -> list[str]:
    """References of an HTML page that load something from outside it (anything but data: URIs and #anchors)."""
    parser = _References()
    parser.feed(page)
    return [ref[:120] for ref in parser.found if ref and not ref.startswith(("data:", "#"))]


def _run(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run Chromium in its own process group; on timeout kill that group (its renderer and GPU processes too)."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise ProbeError(
            f"headless Chromium did not finish within {timeout:.0f} s: {' '.join(command[:3])} ..."
        ) from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def check_in_browser(
    html_path: str | os.PathLike,
    screenshot_path: str | os.PathLike,
    *,
    width: int = 1200,
    max_height: int = 32000,
    timeout: float = 60.0,
) -> BrowserCheck:
    """Open ``html_path`` in headless Chromium and report what it saw (:class:`BrowserCheck`; see its ``problems()``).

    Two runs of the plain Chromium CLI (``--headless=new``; no DevTools client needed):

    1. ``--dump-dom`` of a copy of the page (written next to it, removed afterwards) with a small probe
       script inserted first in <head>. The probe records ``console.error`` calls, uncaught exceptions,
       unhandled rejections and elements that failed to load (their ``error`` events), and on ``load``
       every image's natural size and the page height, into an attribute of <html> that the dumped DOM
       carries back. Chromium's own console log (``--enable-logging=stderr``: its CONSOLE lines) is
       read too: those lines carry no level, so they are all kept in ``console`` and the uncaught
       exceptions among them count as errors.
    2. ``--screenshot`` of the unmodified page in a window ``width`` wide and as high as the page (at
       most ``max_height`` CSS px: a 20000 px page takes about 3 s, 60000 px about 40 s), so the PNG
       is a full-page screenshot.

    ProbeError when no Chromium is installed (:func:`find_chromium`) or a run fails or times out
    (``timeout`` seconds each).
    """
    browser = find_chromium()
    if browser is None:
        raise ProbeError(
            "no Chromium found (looked for $CHROMIUM, "
            + ", ".join(_BROWSERS)
            + "); install it: apt-get install chromium"
        )
    html_path = Path(html_path).resolve()
    screenshot_path = Path(screenshot_path).resolve()
    page = html_path.read_text(encoding="utf-8")
    version = _run([browser, "--version"], timeout).stdout.strip()
    head = re.search(r"<head[^>]*>", page, flags=re.IGNORECASE)
    at = head.end() if head else 0
    probe_path = html_path.with_name(f".{html_path.stem}.browser-check-{os.getpid()}.html")
    probe_path.write_text(page[:at] + _PROBE + page[at:], encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="browser-check-") as profile:
        flags = [
            browser,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
        ]
        try:
            dumped = _run(
                [
                    *flags,
                    "--enable-logging=stderr",
                    "--v=0",
                    f"--window-size={width},900",
                    "--dump-dom",
                    probe_path.as_uri(),
                ],
                timeout,
            )
        finally:
            probe_path.unlink(missing_ok=True)
        found = re.search(_PROBE_ATTRIBUTE + r'="([^"]*)"', dumped.stdout)
        if dumped.returncode != 0 or found is None:
            tail = "\n".join(dumped.stderr.strip().splitlines()[-5:])
            raise ProbeError(
                f"headless Chromium did not load {html_path} (exit code {dumped.returncode}, probe "
                f"{'missing' if found is None else 'ok'}): {tail}"
            )
        probe = json.loads(html.unescape(found.group(1)))
        console, errors = [], list(probe["errors"])
        for line in dumped.stderr.splitlines():
            match = _CONSOLE_LINE.search(line)
            if match:
                message = match.group("message")
                console.append(f"{message} ({match.group('source').replace(probe_path.name, html_path.name)})")
                if message.startswith("Uncaught") and f"uncaught: {message}" not in errors:
                    errors.append(f"uncaught: {message}")
        height = max(int(probe["height"]), 1)
        screenshot_path.parent.mkdir(parents=True, exist_ok=True)
        screenshot_path.unlink(missing_ok=True)
        shot = _run(
            [
                *flags,
                f"--window-size={width},{min(height, max_height)}",
                f"--screenshot={screenshot_path}",
                html_path.as_uri(),
            ],
            timeout,
        )
    check = BrowserCheck(
        browser=f"{browser} ({version})",
        console_errors=errors,
        console=console,
        images=probe["images"],
        page_height=height,
        external_references=external_references(page),
        max_height=max_height,
    )
    if shot.returncode == 0 and screenshot_path.is_file():
        import numpy as np
        from PIL import Image  # installed with matplotlib

        with Image.open(screenshot_path) as image:
            check.screenshot = screenshot_path
            check.screenshot_size = image.size
            pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
        check.screenshot_distinct_colours = len(np.unique(pixels[:: max(1, len(pixels) // 200_000)], axis=0))
    return check
