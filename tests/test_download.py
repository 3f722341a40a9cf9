"""`musetalk download` against a local HTTP server on 127.0.0.1 (no other network): resume, sizes, hashes, atomicity.

The server serves fixture bytes, honours ``Range``, and can cut a response short (full Content-Length, half the
body, then close) the way a dropped connection does.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
import torch

from musetalk.errors import WeightsError
from musetalk.weights import WEIGHTS, WeightFile, load_state_dict
from musetalk.weights import download as dl


class FixtureServer:
    """Files by URL path; ``cut[path] = n`` cuts the next n responses for that path in half."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server.requests.append((self.path, self.headers.get("Range")))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                range_header = self.headers.get("Range")
                if range_header and not server.ignore_range:
                    start = int(range_header.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut.get(self.path, 0) > 0:
                    server.cut[self.path] -= 1
                    body = body[: len(body) // 2]
                    self.close_connection = True
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server() -> Iterator[FixtureServer]:
    srv = FixtureServer()
    yield srv
    srv.close()


def entry_for(server: FixtureServer, name: str, data: bytes, **overrides) -> WeightFile:
    server.files[f"/{name}"] = data
    fields = dict(key=name, part=name, group="common", dest=f"sub/{name}", url=f"{server.url}/{name}",
                  size=len(data), sha256=hashlib.sha256(data).hexdigest(), format="legacy")
    return WeightFile(**{**fields, **overrides})


def payload(n: int = 300_000) -> bytes:
    return bytes((i * 7919) % 251 for i in range(n))


def test_a_dropped_connection_resumes_with_range(server: FixtureServer, tmp_path: Path) -> None:
    data = payload()
    entry = entry_for(server, "w.bin", data)
    server.cut["/w.bin"] = 1
    path = dl.fetch(entry, tmp_path, log=lambda _: None)
    assert path.read_bytes() == data and not list(tmp_path.rglob("*.part"))
    ranges = [r for p, r in server.requests if p == "/w.bin"]
    assert ranges[0] is None and ranges[1] == f"bytes={len(data) // 2}-"  # the second request asks for the rest


def test_an_interrupted_download_resumes_on_the_next_run(server: FixtureServer, tmp_path: Path) -> None:
    data = payload()
    entry = entry_for(server, "w.bin", data)
    server.cut["/w.bin"] = 5
    with pytest.raises(WeightsError, match="incomplete after 2 attempts") as exc:
        dl.fetch(entry, tmp_path, attempts=2, log=lambda _: None)
    assert "musetalk download" in exc.value.fix
    part = tmp_path / "sub" / "w.bin.part"
    assert part.is_file() and not (tmp_path / "sub" / "w.bin").exists()  # nothing half-written under the name
    have = part.stat().st_size
    assert 0 < have < len(data) and data.startswith(part.read_bytes())
    server.cut.clear()
    server.requests.clear()
    assert dl.fetch(entry, tmp_path, log=lambda _: None).read_bytes() == data
    assert server.requests == [("/w.bin", f"bytes={have}-")]


def test_a_wrong_hash_is_refused_and_the_part_removed(server: FixtureServer, tmp_path: Path) -> None:
    entry = entry_for(server, "w.bin", payload(), sha256="0" * 64)
    with pytest.raises(WeightsError, match="SHA-256 .* expected 0000") as exc:
        dl.fetch(entry, tmp_path, log=lambda _: None)
    assert "w.bin" in exc.value.message and exc.value.fix
    assert not list((tmp_path / "sub").iterdir())  # neither the file nor its .part
    prefix = entry_for(server, "r.bin", payload(), sha256=None, sha256_prefix="5c106cde")
    with pytest.raises(WeightsError, match=r"expected 5c106cde\.\.\."):
        dl.fetch(prefix, tmp_path, log=lambda _: None)
    good_prefix = replace(prefix, sha256_prefix=hashlib.sha256(payload()).hexdigest()[:8])
    assert dl.fetch(good_prefix, tmp_path, log=lambda _: None).is_file()


def test_a_wrong_size_is_refused_and_missing_files_are_named(server: FixtureServer, tmp_path: Path) -> None:
    entry = entry_for(server, "w.bin", payload(), size=len(payload()) - 1, sha256=None)
    with pytest.raises(WeightsError, match="wrong size"):
        dl.fetch(entry, tmp_path, log=lambda _: None)
    assert not list((tmp_path / "sub").iterdir())
    gone = replace(entry, url=f"{server.url}/nothing-here.bin")
    with pytest.raises(WeightsError, match="HTTP 404"):
        dl.fetch(gone, tmp_path, log=lambda _: None)


def test_a_server_ignoring_range_starts_over(server: FixtureServer, tmp_path: Path) -> None:
    data = payload()
    entry = entry_for(server, "w.bin", data)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.bin.part").write_bytes(b"x" * 1000)  # not even a prefix of the file
    server.ignore_range = True
    assert dl.fetch(entry, tmp_path, log=lambda _: None).read_bytes() == data


def test_download_through_hf_endpoint_verifies_and_converts(server: FixtureServer, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole command path: HF-style URLs under HF_ENDPOINT, a legacy checkpoint read back, --convert."""
    source = tmp_path / "src.pth"
    state = {"w": torch.randn(8, 8), "h": torch.randn(3).half()}
    torch.save(state, source, _use_new_zipfile_serialization=False)
    data = source.read_bytes()
    server.files["/org/repo/resolve/main/folder/w.pth"] = data
    server.files["/org/repo/resolve/main/config.json"] = b'{"a": 1}'
    entries = [WeightFile("w", "w", "common", "part/w.pth", "org/repo", "folder/w.pth", size=len(data),
                          sha256=hashlib.sha256(data).hexdigest(), format="legacy"),
               WeightFile("c", "c", "common", "part/config.json", "org/repo", "config.json", format="json")]
    monkeypatch.setattr(dl, "plan", lambda *a, **k: entries)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    lines: list[str] = []
    fetched = dl.download(tmp_path / "models", ["v15"], convert=True, log=lines.append)
    assert [p.name for p in fetched] == ["w.pth", "config.json"]
    converted = tmp_path / "models" / "part" / "w.safetensors"
    assert converted.is_file()
    loaded = load_state_dict(tmp_path / "models" / "part" / "w.pth")
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in state.items())
    server.requests.clear()
    dl.download(tmp_path / "models", ["v15"], log=lines.append)  # everything present: nothing fetched
    assert server.requests == [] and any(line.startswith("present") for line in lines)


def test_the_plan_comes_from_the_registry() -> None:
    v15 = [e.dest for e in dl.plan(["v15"])]
    assert WEIGHTS["unet-v15"].dest in v15 and WEIGHTS["face-parse"].dest in v15
    assert WEIGHTS["unet-v1"].dest not in v15 and WEIGHTS["dwpose"].dest not in v15
    assert WEIGHTS["dwpose"].dest in [e.dest for e in dl.plan(["v15"], dwpose=True)]
    assert {WEIGHTS["syncnet"].dest, WEIGHTS["s3fd"].dest} <= {e.dest for e in dl.plan(["v1"], syncnet=True)}
    assert WEIGHTS["unet-v15"].source_url("https://mirror.example") == \
        "https://mirror.example/TMElyralab/MuseTalk/resolve/main/musetalkV15/unet.pth"
