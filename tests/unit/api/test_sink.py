"""Sink: a failed object-storage upload is aborted (never published), a good one lands at the
final key only, and lineage names the final path once, after the rename.

The store is a real fsspec filesystem registered under a test protocol, with files built on
``fsspec.spec.AbstractBufferedFile``: the machinery of s3fs/gcsfs/adlfs. Like them it starts a
multipart upload, uploads parts as the buffer fills, *completes* the upload (publishes the
object) in ``close()`` and aborts it in ``discard()``.
"""

from __future__ import annotations

import gc
import json
import uuid

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from airflow_papertrail.api.sink import Sink

PROTOCOL = "pttestmpu"


class MultipartFile(AbstractBufferedFile):
    def _initiate_upload(self) -> None:
        self.upload_id = uuid.uuid4().hex
        self.fs.uploads[self.upload_id] = []
        self.fs.events.append(("initiate", self.path))

    def _upload_chunk(self, final: bool = False) -> bool:
        self.fs.uploads[self.upload_id].append(self.buffer.getvalue())
        self.fs.events.append(("part", self.path))
        if final:
            self.fs.objects[self.path] = b"".join(self.fs.uploads.pop(self.upload_id))
            self.fs.events.append(("complete", self.path))
        return True

    def discard(self) -> None:  # what s3fs does: abort the multipart upload, drop the buffer
        upload_id = getattr(self, "upload_id", None)
        if upload_id is not None:
            self.fs.uploads.pop(upload_id, None)
        self.fs.events.append(("abort", self.path))
        self.buffer = None


class MultipartStore(AbstractFileSystem):
    """One remote store: every instance (Airflow's attached one, the one fsspec/UPath builds
    for the protocol) sees the same objects, as every s3fs instance sees the same bucket."""

    protocol = PROTOCOL
    root_marker = ""
    cachable = False
    state: dict = {}

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.objects: dict[str, bytes] = self.state.setdefault("objects", {})
        self.uploads: dict[str, list[bytes]] = self.state.setdefault("uploads", {})
        self.events: list[tuple[str, str]] = self.state.setdefault("events", [])

    @classmethod
    def _strip_protocol(cls, path):
        path = super()._strip_protocol(path)
        return path.lstrip("/")

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        # 16-byte parts: any real extraction spans several, so a failure hits a live upload
        return MultipartFile(self, path, mode, block_size=16, autocommit=autocommit, cache_options=cache_options)

    def cat_file(self, path, start=None, end=None, **kwargs):
        return self.objects[self._strip_protocol(path)][start:end]

    def info(self, path, **kwargs):
        path = self._strip_protocol(path)
        if path in self.objects:
            return {"name": path, "size": len(self.objects[path]), "type": "file"}
        prefix = path.rstrip("/") + "/"
        if any(key.startswith(prefix) for key in self.objects):
            return {"name": path, "size": 0, "type": "directory"}
        raise FileNotFoundError(path)

    def ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path).rstrip("/")
        names = sorted(
            {path + "/" + key[len(path) + 1 :].split("/")[0] for key in self.objects if key.startswith(path + "/")}
        )
        entries = [self.info(name) for name in names]
        return entries if detail else [e["name"] for e in entries]

    def cp_file(self, path1, path2, **kwargs):
        self.objects[self._strip_protocol(path2)] = self.objects[self._strip_protocol(path1)]
        self.events.append(("copy", self._strip_protocol(path2)))

    def _rm(self, path):
        self.objects.pop(self._strip_protocol(path))
        self.events.append(("delete", self._strip_protocol(path)))

    def rm_file(self, path):
        self._rm(path)

    def mkdir(self, path, create_parents=True, **kwargs):
        pass

    def makedirs(self, path, exist_ok=False):
        pass


class Boom(RuntimeError):
    pass


@pytest.fixture
def store():
    from airflow.sdk.io import store as airflow_store

    fsspec.register_implementation(PROTOCOL, MultipartStore, clobber=True)
    MultipartStore.state = {}
    fs = MultipartStore()
    airflow_store._STORE_CACHE.pop(PROTOCOL, None)
    airflow_store.attach(PROTOCOL, fs=fs)
    yield fs
    airflow_store._STORE_CACHE.pop(PROTOCOL, None)
    airflow_store._STORE_CACHE.pop(f"{PROTOCOL}-my_store", None)


@pytest.fixture
def collector(monkeypatch):
    """A real HookLineageCollector, enabled the way Airflow enables it: a lineage reader plugin."""
    from airflow.sdk import lineage, plugins_manager

    lineage.get_hook_lineage_collector.cache_clear()
    monkeypatch.setattr(plugins_manager, "get_hook_lineage_readers_plugins", lambda: [lineage.HookLineageReader])
    active = lineage.get_hook_lineage_collector()
    assert type(active) is lineage.HookLineageCollector
    yield active
    lineage.get_hook_lineage_collector.cache_clear()


def _outputs(collector) -> list[tuple[str, int]]:
    return [(info.asset.uri, info.count) for info in collector.collected_assets.outputs]


LINES = [json.dumps({"id": f"GL-{i:06d}", "amount": "12.50"}).encode() + b"\n" for i in range(20)]


def _write_then_break(sink) -> None:
    with sink.open() as fh:
        for line in LINES[:10]:
            fh.write(line)
        raise Boom("the connection broke")


def _fail_half_way(sink) -> None:
    with pytest.raises(Boom):
        _write_then_break(sink)


def _aborted_upload_leaves_nothing(sink_class, store, collector) -> None:
    """The test body, parametrised on the sink class so it can be run against the old _Sink."""
    from airflow.sdk import ObjectStoragePath

    final = ObjectStoragePath(f"{PROTOCOL}://bucket/2024-03-01/gl__list_gl_transaction.jsonl")
    sink = sink_class(final)
    _fail_half_way(sink)
    gc.collect()  # an unclosed buffered file would complete its upload in __del__

    assert store.objects == {}, "a partial object was published (at the temporary or the final key)"
    assert store.uploads == {}, "the multipart upload was left open"
    kinds = [kind for kind, _ in store.events]
    assert "part" in kinds  # the failure hit a live multipart upload
    assert "abort" in kinds, "discard() was not called"
    assert "complete" not in kinds, "close() completed the upload of a failed extraction"
    assert _outputs(collector) == []  # no lineage for a failed extraction


def test_a_failed_upload_is_aborted_never_published(store, collector):
    _aborted_upload_leaves_nothing(Sink, store, collector)


def test_a_complete_upload_lands_at_the_final_key_only_with_one_lineage_output(store, collector):
    sink = Sink(f"{PROTOCOL}://bucket/2024-03-01/gl__list_gl_transaction.jsonl")
    with sink.open() as fh:
        for line in LINES:
            fh.write(line)
    assert _outputs(collector) == []  # nothing before the commit: not the temporary key either
    sink.commit()

    assert store.objects == {"bucket/2024-03-01/gl__list_gl_transaction.jsonl": b"".join(LINES)}
    assert store.uploads == {}
    (completed,) = [path for kind, path in store.events if kind == "complete"]
    assert completed.startswith("bucket/2024-03-01/.gl__list_gl_transaction.jsonl.") and completed.endswith(".part")
    assert _outputs(collector) == [(f"{PROTOCOL}://bucket/2024-03-01/gl__list_gl_transaction.jsonl", 1)]
    assert collector.collected_assets.inputs == []
    assert sink.report_lineage() is False  # once only
    assert _outputs(collector) == [(f"{PROTOCOL}://bucket/2024-03-01/gl__list_gl_transaction.jsonl", 1)]


def test_lineage_names_the_object_not_the_connection(store, collector):
    from airflow.sdk import ObjectStoragePath
    from airflow.sdk.io import store as airflow_store

    airflow_store.attach(PROTOCOL, conn_id="my_store", fs=store)  # the store behind that connection
    final = ObjectStoragePath(f"{PROTOCOL}://bucket/a.jsonl", conn_id="my_store")
    assert str(final) == f"{PROTOCOL}://my_store@bucket/a.jsonl"  # how Airflow prints it
    sink = Sink(final)
    with sink.open() as fh:
        fh.write(b"{}\n")
    sink.commit()
    assert _outputs(collector) == [(f"{PROTOCOL}://bucket/a.jsonl", 1)]


def test_a_retry_after_a_failure_publishes_once(store, collector):
    """DataClient.extract reopens the same sink after a broken body: the second try wins."""
    sink = Sink(f"{PROTOCOL}://bucket/b.jsonl")
    _fail_half_way(sink)
    with sink.open() as fh:
        fh.write(b"".join(LINES))
    sink.commit()
    assert store.objects == {"bucket/b.jsonl": b"".join(LINES)}
    assert [kind for kind, _ in store.events].count("complete") == 1
    assert _outputs(collector) == [(f"{PROTOCOL}://bucket/b.jsonl", 1)]


class _InPlace:
    """A destination with open("wb") but no with_name/rename: written in place."""

    def __init__(self, fs: MultipartStore, path: str) -> None:
        self.fs_ = fs
        self.key = path

    def open(self, mode: str):
        return self.fs_.open(self.key, mode)

    def unlink(self) -> None:
        self.fs_.rm(self.key)

    def __str__(self) -> str:
        return f"{PROTOCOL}://{self.key}"


def test_an_aborted_in_place_upload_keeps_the_previous_object(store, collector):
    store.objects["bucket/c.jsonl"] = b"yesterday\n"
    sink = Sink(_InPlace(store, "bucket/c.jsonl"))
    assert sink.temp is None
    _fail_half_way(sink)
    gc.collect()
    assert store.objects == {"bucket/c.jsonl": b"yesterday\n"}  # the upload never completed
    assert _outputs(collector) == []


def test_a_failed_close_removes_the_temporary_object(store, collector, monkeypatch):
    """The completion of the upload itself fails: nothing at the final key, no lineage."""

    def refuse(self, final=False):
        raise OSError("the store refused the last part")

    monkeypatch.setattr(MultipartFile, "_upload_chunk", refuse)
    sink = Sink(f"{PROTOCOL}://bucket/d.jsonl")

    def write() -> None:
        with sink.open() as fh:
            fh.write(b"x\n")

    with pytest.raises(OSError, match="last part"):
        write()
    assert store.objects == {}
    assert _outputs(collector) == []


def test_memory_filesystem_failure_leaves_nothing(collector):
    """fsspec's memory files are not buffered uploads (visible at once, no-op discard): removed."""
    from airflow.sdk import ObjectStoragePath
    from airflow.sdk.io import store as airflow_store

    fs = MemoryFileSystem()
    fs.store.clear()
    airflow_store._STORE_CACHE.pop("memory", None)
    airflow_store.attach("memory", fs=fs)
    try:
        sink = Sink(ObjectStoragePath("memory://bucket/e.jsonl"))
        _fail_half_way(sink)
        assert [k for k in fs.store if "e.jsonl" in k] == []
        with sink.open() as fh:
            fh.write(b"ok\n")
        sink.commit()
        assert [k for k in fs.store if "e.jsonl" in k] == ["/bucket/e.jsonl"]
        assert fs.cat("/bucket/e.jsonl") == b"ok\n"
        assert _outputs(collector) == [("memory://bucket/e.jsonl", 1)]
    finally:
        airflow_store._STORE_CACHE.pop("memory", None)
        fs.store.clear()


def test_local_file_lineage_is_the_absolute_file_uri(tmp_path, collector, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sink = Sink("out/2024-03-01/a.jsonl")  # relative: reported absolute
    with sink.open() as fh:
        fh.write(b"{}\n")
    sink.commit()
    final = tmp_path / "out" / "2024-03-01" / "a.jsonl"
    assert final.read_bytes() == b"{}\n"
    assert sorted(p.name for p in final.parent.iterdir()) == ["a.jsonl"]
    assert _outputs(collector) == [(final.as_uri(), 1)]


def test_local_failure_leaves_no_file_and_no_lineage(tmp_path, collector):
    (tmp_path / "a.jsonl").write_bytes(b"yesterday\n")
    sink = Sink(tmp_path / "a.jsonl")
    _fail_half_way(sink)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]
    assert (tmp_path / "a.jsonl").read_bytes() == b"yesterday\n"
    assert _outputs(collector) == []


def test_lineage_off_and_a_given_context(tmp_path, collector):
    quiet = Sink(tmp_path / "q.jsonl", lineage=False)
    with quiet.open() as fh:
        fh.write(b"1\n")
    quiet.commit()
    assert _outputs(collector) == []

    marker = object()
    loud = Sink(tmp_path / "l.jsonl", lineage_context=marker)
    with loud.open() as fh:
        fh.write(b"1\n")
    loud.commit()
    (info,) = collector.collected_assets.outputs
    assert info.context is marker and info.asset.uri == (tmp_path / "l.jsonl").as_uri()


def test_without_an_enabled_collector_nothing_breaks(tmp_path):
    from airflow.sdk import lineage

    lineage.get_hook_lineage_collector.cache_clear()
    try:
        sink = Sink(tmp_path / "n.jsonl")
        with sink.open() as fh:
            fh.write(b"1\n")
        sink.commit()
        assert (tmp_path / "n.jsonl").read_bytes() == b"1\n"
        assert lineage.get_hook_lineage_collector().collected_assets.outputs == []  # NoOpCollector
    finally:
        lineage.get_hook_lineage_collector.cache_clear()


def test_data_client_extract_through_the_sink(emulator, store, collector):
    """DataClient.extract end to end through this Sink."""
    from airflow_papertrail.api import client as client_module
    from airflow_papertrail.api.client import PapertrailApiError
    from tests.unit.api.support import TokenSource, data_client

    assert client_module.Sink is Sink
    client = data_client(emulator, TokenSource(emulator))
    try:
        result = client.extract("gl", "list_gl_accounts", f"{PROTOCOL}://bucket/gl.jsonl", params={"count": 25})
        assert result["records"] == 25
        assert list(store.objects) == ["bucket/gl.jsonl"] and len(store.objects["bucket/gl.jsonl"]) == result["bytes"]

        emulator.inject("api", status=200, body='{"data": [{"a": 1}, oops')
        with pytest.raises(PapertrailApiError, match="not the expected JSON"):
            client.extract("gl", "list_gl_accounts", f"{PROTOCOL}://bucket/broken.jsonl")
    finally:
        client.close()
    assert list(store.objects) == ["bucket/gl.jsonl"] and store.uploads == {}
    assert _outputs(collector) == [(f"{PROTOCOL}://bucket/gl.jsonl", 1)]
