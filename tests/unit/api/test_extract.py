"""DataClient.extract: JSON lines, bounded memory, atomic publication, restart on a broken body."""

from __future__ import annotations

import http.server
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from airflow_papertrail.api.client import PapertrailApiError, TransientApiError
from airflow_papertrail.exceptions import PapertrailConfigurationError
from tests.conftest import append_captured
from tests.unit.api.support import FAST

REPO = Path(__file__).resolve().parents[3]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


_MEMORY_PROBE = r"""
import json, os, resource, sys
from airflow_papertrail.api.client import DataClient
client = DataClient(api_url=sys.argv[1], default_system="xero", token_provider=lambda force: os.environ["PT_TOKEN"])
client.query("company", "co_details")  # warm up: imports, connection pool
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = client.extract("gl", "list_gl_transaction", sys.argv[2], params={"count": int(sys.argv[3])})
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"result": result, "before_kib": before, "after_kib": after}))
"""


def test_extract_100k_records_in_bounded_memory(emulator, tokens, tmp_path):
    destination = tmp_path / "gl.jsonl"
    env = {**os.environ, "PT_TOKEN": tokens.token.access_token, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, emulator.base_url + "/api", str(destination), "100000"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    append_captured(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["result"]["records"] == 100_000
    size = destination.stat().st_size
    assert report["result"]["bytes"] == size
    with destination.open() as fh:
        count = 0
        for count, line in enumerate(fh, 1):
            if count in (1, 100_000):
                assert json.loads(line)["id"] == f"GL-{count:06d}"
    assert count == 100_000
    # The body is as large as the file (compact JSON either way); holding it, or the parsed
    # list, would raise the peak by more than that. Streaming raises it by a few MiB at most.
    growth_bytes = (report["after_kib"] - report["before_kib"]) * 1024
    print(f"peak RSS {report['after_kib']} KiB, growth during extract {growth_bytes} bytes, file {size} bytes")
    assert size > 15_000_000
    assert growth_bytes < size / 3, (growth_bytes, size)
    assert tokens.token.access_token not in proc.stdout + proc.stderr


def test_lines_are_compact_json_one_record_each(client, tmp_path):
    destination = tmp_path / "vendors.jsonl"
    result = client.extract("vendors", "list_invoices", destination, params={"count": 57})
    assert result == {"path": str(destination), "records": 57, "bytes": destination.stat().st_size}
    text = destination.read_text()
    assert text.endswith("\n") and text.count("\n") == 57
    first = text.splitlines()[0]
    assert first == json.dumps(json.loads(first), separators=(",", ":"))
    assert [r["id"] for r in _lines(destination)] == [f"PI-{i:06d}" for i in range(1, 58)]


def test_a_report_is_one_line(client, tmp_path):
    destination = tmp_path / "income.jsonl"
    result = client.extract("reports", "income_statement", destination)
    (line,) = _lines(destination)
    assert result["records"] == 1 and line["net_profit"] == "1200.00"


def test_parents_are_created_and_no_temporary_file_remains(client, tmp_path):
    destination = tmp_path / "a" / "b" / "bank.jsonl"
    client.extract("bank", "bank_accounts_list", str(destination))
    assert sorted(p.name for p in destination.parent.iterdir()) == ["bank.jsonl"]


@pytest.mark.parametrize(
    "fault",
    [{"status": 400, "body": {"error": "invalid_request"}}, {"status": 200, "body": "<html>oops</html>"}],
)
def test_a_failed_extract_keeps_the_previous_file_and_leaves_no_temporary(emulator, client, tmp_path, fault):
    destination = tmp_path / "bank.jsonl"
    destination.write_text("previous complete extract\n")
    emulator.inject("api", **fault)
    with pytest.raises(PapertrailApiError):
        client.extract("bank", "bank_list", destination)
    assert destination.read_text() == "previous complete extract\n"
    assert [p.name for p in tmp_path.iterdir()] == ["bank.jsonl"]


def test_object_storage_path_and_file_url_destinations(client, tmp_path):
    from airflow.sdk import ObjectStoragePath

    target = ObjectStoragePath(f"file://{tmp_path}/osp/users.jsonl")
    result = client.extract("company", "users", target, params={"count": 3})
    assert result["path"] == str(target) and result["records"] == 3
    assert len(_lines(tmp_path / "osp" / "users.jsonl")) == 3
    client.extract("company", "users", f"file://{tmp_path}/url/users.jsonl", params={"count": 4})
    assert len(_lines(tmp_path / "url" / "users.jsonl")) == 4


class MemoryStore:
    """An object store in a dict: objects appear on close(), like S3/GCS uploads."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.renames: list[tuple[str, str]] = []


class MemoryPath:
    protocol = "mem"

    def __init__(self, store: MemoryStore, key: str) -> None:
        self.store, self.key = store, key

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    def with_name(self, name: str) -> MemoryPath:
        return MemoryPath(self.store, self.key.rsplit("/", 1)[0] + "/" + name)

    def open(self, mode: str) -> io.BytesIO:
        assert mode == "wb"
        store, key = self.store, self.key

        class Upload(io.BytesIO):
            def close(self) -> None:
                if not self.closed:
                    store.objects[key] = self.getvalue()
                super().close()

        return Upload()

    def rename(self, target: MemoryPath) -> MemoryPath:
        self.store.objects[target.key] = self.store.objects.pop(self.key)
        self.store.renames.append((self.key, target.key))
        return target

    def unlink(self) -> None:
        self.store.objects.pop(self.key, None)

    def __str__(self) -> str:
        return f"mem://{self.key}"


def test_remote_destinations_are_written_under_a_temporary_name_then_renamed(emulator, client):
    store = MemoryStore()
    result = client.extract("gl", "list_gl_accounts", MemoryPath(store, "books/gl.jsonl"), params={"count": 10})
    assert result["path"] == "mem://books/gl.jsonl" and result["records"] == 10
    assert list(store.objects) == ["books/gl.jsonl"]
    ((temp, final),) = store.renames
    assert final == "books/gl.jsonl" and temp.startswith("books/.gl.jsonl.") and temp.endswith(".part")

    emulator.inject("api", status=200, body='{"data": [{"a": 1}, oops')
    with pytest.raises(PapertrailApiError, match="not the expected JSON"):
        client.extract("gl", "list_gl_accounts", MemoryPath(store, "books/broken.jsonl"))
    assert list(store.objects) == ["books/gl.jsonl"]  # the partial upload was removed


def test_extract_refuses_writes(client, tmp_path):
    with pytest.raises(PapertrailConfigurationError, match="changes data"):
        client.extract("vendors", "create_invoice", tmp_path / "x.jsonl")
    with pytest.raises(PapertrailConfigurationError, match="ObjectStoragePath"):
        client.extract("bank", "bank_list", 42)
    assert list(tmp_path.iterdir()) == []


class _BreakingHandler(http.server.BaseHTTPRequestHandler):
    """Answers 200 with a chunked body that breaks off after one record, ``failures`` times."""

    protocol_version = "HTTP/1.1"
    failures = 0
    served = 0

    def do_GET(self) -> None:
        cls = type(self)
        cls.served += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        head = b'{"status":"ok","data":[{"id":1},'
        self.wfile.write(b"%X\r\n%s\r\n" % (len(head), head))
        if cls.served <= cls.failures:
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # cut: no terminating chunk
            return
        rest = b'{"id":2},{"id":3}]}'
        self.wfile.write(b"%X\r\n%s\r\n0\r\n\r\n" % (len(rest), rest))

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def breaking_server():
    handler = type("Handler", (_BreakingHandler,), {"failures": 0, "served": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server, handler
    finally:
        server.shutdown()
        server.server_close()


def _client_for(server):
    from airflow_papertrail.api.client import DataClient

    host, port = server.server_address[:2]
    return DataClient(
        api_url=f"http://{host}:{port}/api", default_system="xero", token_provider=lambda f: "t", retry_policy=FAST
    )


def test_a_body_that_breaks_off_is_downloaded_again(breaking_server, tmp_path):
    server, handler = breaking_server
    handler.failures = 2
    destination = tmp_path / "bank.jsonl"
    result = _client_for(server).extract("bank", "bank_list", destination)
    assert handler.served == 3
    assert result["records"] == 3 and [r["id"] for r in _lines(destination)] == [1, 2, 3]  # no duplicates


def test_a_body_that_always_breaks_off_fails_without_leaving_a_file(breaking_server, tmp_path):
    server, handler = breaking_server
    handler.failures = 100
    with pytest.raises(TransientApiError, match="connection broke") as err:
        _client_for(server).extract("bank", "bank_list", tmp_path / "bank.jsonl")
    assert handler.served == FAST.total + 1
    assert "after 1 records" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_query_reads_a_broken_body_again_but_never_a_write(breaking_server):
    from airflow_papertrail.api.client import WriteOutcomeUnknown

    server, handler = breaking_server
    handler.failures = 1
    assert _client_for(server).query("bank", "bank_list")["data"] == [{"id": 1}, {"id": 2}, {"id": 3}]
    assert handler.served == 2
    handler.failures, handler.served = 1, 0
    with pytest.raises(WriteOutcomeUnknown, match="accepted the write") as err:
        _client_for(server).query("customers", "create_customer", payload={"name": "A"})
    assert "NOT retried" in str(err.value) and handler.served == 1


def test_iter_records_reports_a_broken_body(breaking_server):
    server, handler = breaking_server
    handler.failures = 1
    records = _client_for(server).iter_records("bank", "bank_list")
    assert next(records) == {"id": 1}
    with pytest.raises(TransientApiError, match="after 1 records"):
        next(records)
    assert handler.served == 1


class NoRenamePath(MemoryPath):
    """A store path that cannot rename: written in place."""

    with_name = None  # type: ignore[assignment]
    rename = None  # type: ignore[assignment]


def test_in_place_remote_writes_are_removed_when_they_fail(emulator, client):
    store = MemoryStore()
    assert client.extract("company", "users", NoRenamePath(store, "u.jsonl"), params={"count": 2})["records"] == 2
    assert list(store.objects) == ["u.jsonl"] and store.renames == []
    emulator.inject("api", status=200, body='{"data": [{"a": 1}, oops')
    with pytest.raises(PapertrailApiError):
        client.extract("company", "users", NoRenamePath(store, "u.jsonl"))
    assert store.objects == {}  # no partial object that looks complete
