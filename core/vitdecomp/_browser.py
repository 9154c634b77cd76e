"""A headless Chromium driven over the DevTools protocol, for checking the static pages vitdecomp writes (the
component atlas): console errors, broken links, missing images, load time, screenshots.

Standard library only: a minimal RFC 6455 websocket client (text frames, masking, fragmentation, ping/pong) talks to
``chromium --remote-debugging-port``. Used by the tests and ``benchmarks/atlas.py``; not part of the public API.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import List, Optional

import attrs

__all__ = ["find_chromium", "Chromium", "PageReport", "CHROMIUM_FLAGS"]

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


def find_chromium() -> Optional[str]:
    """Path of a Chromium / Chrome executable (``VITDECOMP_CHROMIUM`` overrides), or None."""
    env = os.environ.get("VITDECOMP_CHROMIUM")
    if env:
        return env if shutil.which(env) or Path(env).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


class _WebSocket:
    """The client side of a websocket (RFC 6455), enough for the DevTools protocol."""

    def __init__(self, url: str, timeout: float = 30.0):
        u = urllib.parse.urlparse(url)
        self.sock = socket.create_connection((u.hostname, u.port or 80), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        req = (f"GET {u.path or '/'} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self.sock.sendall(req.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            head += chunk
        status, rest = head.split(b"\r\n\r\n", 1)
        if b" 101 " not in status.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket handshake refused: {status.splitlines()[0]!r}")
        self._buf = rest

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self._buf)))
            if not chunk:
                raise ConnectionError("websocket closed")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + body)

    def send(self, text: str) -> None:
        self._frame(0x1, text.encode())

    def recv(self) -> str:
        parts = []
        while True:
            b0, b1 = self._read(2)
            fin, opcode, n = b0 & 0x80, b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            data = self._read(n)
            if mask:
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
            if opcode == 0x8:
                raise ConnectionError("websocket closed by the browser")
            if opcode == 0x9:
                self._frame(0xA, data)
                continue
            if opcode == 0xA:
                continue
            parts.append(data)
            if fin:
                return b"".join(parts).decode("utf-8", "replace")

    def close(self) -> None:
        try:
            self._frame(0x8, b"")
        except OSError:
            pass
        self.sock.close()


@attrs.define
class PageReport:
    """What a page did when loaded: ``console_errors`` (console.error, uncaught exceptions, failed loads the
    browser logged), ``broken_links`` (href/src targets that do not exist), ``missing_images`` (img elements that
    did not decode), ``external`` (references to the network), ``load_ms`` (navigation start → load event)."""

    url: str
    console_errors: List[str] = attrs.field(factory=list)
    broken_links: List[str] = attrs.field(factory=list)
    missing_images: List[str] = attrs.field(factory=list)
    external: List[str] = attrs.field(factory=list)
    links: List[str] = attrs.field(factory=list)
    load_ms: Optional[float] = None

    @property
    def ok(self) -> bool:
        return not (self.console_errors or self.broken_links or self.missing_images or self.external)


_COLLECT = r"""
(async () => {
  document.querySelectorAll('img[loading="lazy"]').forEach(i => { i.loading = 'eager'; });
  const imgs = Array.from(document.images);
  await Promise.all(imgs.map(i => i.complete ? null : new Promise(r => { i.onload = r; i.onerror = r; })));
  await new Promise(r => setTimeout(r, 50));
  const refs = [];
  document.querySelectorAll('a[href]').forEach(a => refs.push(a.href));
  document.querySelectorAll('link[href]').forEach(a => refs.push(a.href));
  document.querySelectorAll('script[src], img[src], iframe[src], source[src]').forEach(a => refs.push(a.src));
  const ids = Array.from(document.querySelectorAll('[id]')).map(e => e.id);
  const nav = performance.getEntriesByType('navigation')[0];
  return JSON.stringify({
    refs: refs,
    ids: ids,
    missing: imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src),
    load: nav ? nav.loadEventEnd : null,
  });
})()
"""


class Chromium:
    """A headless Chromium with a fresh profile; ``open(path)`` loads a page and reports on it.

    Use as a context manager; ``screenshot(path)`` saves the current page as PNG.
    """

    def __init__(self, executable: Optional[str] = None, *, width: int = 1280, height: int = 900,
                 timeout: float = 60.0):
        self.executable = executable or find_chromium()
        if not self.executable:
            raise FileNotFoundError("no chromium executable found (apt-get install chromium)")
        self.timeout = timeout
        self.width, self.height = width, height
        self.profile = tempfile.mkdtemp(prefix="vitdecomp-chromium-")
        args = [self.executable, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
                f"--window-size={width},{height}", "about:blank"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        port_file = Path(self.profile) / "DevToolsActivePort"
        t0 = time.monotonic()
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() - t0 > timeout:
                err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.poll() is not None else ""
                self.close()
                raise RuntimeError(f"chromium did not start: {err}")
            time.sleep(0.05)
        self.port = int(port_file.read_text().split()[0])
        page = None
        while page is None:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=timeout) as r:
                targets = json.loads(r.read())
            page = next((t for t in targets if t.get("type") == "page"), None)
            if page is None:
                time.sleep(0.05)
        self.ws = _WebSocket(page["webSocketDebuggerUrl"], timeout=timeout)
        self._id = 0
        self.events: List[dict] = []
        for m in ("Page.enable", "Runtime.enable", "Log.enable"):
            self.call(m)
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            ws.close()
            self.ws = None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def call(self, method: str, **params) -> dict:
        self._id += 1
        mid = self._id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def _wait_event(self, name: str, timeout: float) -> dict:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            for k, e in enumerate(self.events):
                if e["method"] == name:
                    return self.events.pop(k)
            msg = json.loads(self.ws.recv())
            if "method" in msg:
                self.events.append(msg)
        raise TimeoutError(f"no {name} within {timeout} s")

    def evaluate(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"evaluate: {r['exceptionDetails'].get('text')}")
        return r["result"].get("value")

    def open(self, path) -> PageReport:
        """Load ``path`` (a file path or URL), wait for it and every image, and report what went wrong."""
        url = Path(path).resolve().as_uri() if "://" not in str(path) else str(path)
        self.events.clear()
        self.call("Page.navigate", url=url)
        self._wait_event("Page.loadEventFired", self.timeout)
        data = json.loads(self.evaluate(_COLLECT))
        rep = PageReport(url=url, load_ms=data["load"])
        # drain events that arrived during the collection
        self.call("Runtime.evaluate", expression="0")
        for e in self.events:
            m, p = e["method"], e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                rep.console_errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
            elif m == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                rep.console_errors.append(d.get("exception", {}).get("description") or d.get("text", "exception"))
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                rep.console_errors.append(f"{p['entry'].get('text')} {p['entry'].get('url', '')}".strip())
        self.events.clear()
        ids = set(data["ids"])
        page_file = urllib.parse.urlparse(url).path
        for ref in dict.fromkeys(data["refs"]):
            rep.links.append(ref)
            u = urllib.parse.urlparse(ref)
            if u.scheme in ("http", "https", "ws", "wss") or ref.startswith("//"):
                rep.external.append(ref)
            elif u.scheme == "file":
                target = urllib.parse.unquote(u.path)
                if not Path(target).is_file():
                    rep.broken_links.append(ref)
                elif u.fragment and target == urllib.parse.unquote(page_file) and u.fragment not in ids:
                    rep.broken_links.append(ref)
            elif u.scheme not in ("data", "javascript", "about", "mailto"):
                rep.broken_links.append(ref)
        rep.missing_images = list(dict.fromkeys(data["missing"]))
        return rep

    def screenshot(self, out, *, full_page: bool = True, max_height: int = 6000) -> Path:
        """Save the current page as a PNG (the whole page up to ``max_height`` pixels)."""
        params = {"format": "png"}
        if full_page:
            m = self.call("Page.getLayoutMetrics")
            size = m.get("cssContentSize") or m.get("contentSize")
            h = min(int(size["height"]), max_height)
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": self.width, "height": max(h, 1), "scale": 1})
        r = self.call("Page.captureScreenshot", **params)
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(r["data"]))
        return out
