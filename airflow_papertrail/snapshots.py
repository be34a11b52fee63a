"""The per-run layout of extractions: one folder per DAG run, a manifest written last.

``papertrail_extract`` writes every run to its own folder::

    {base_path}/{date}/{run_id made path-safe}/
        bank__bank_list.jsonl
        ...
        _MANIFEST.json          <- written last, atomically; its presence means "complete"

``papertrail_extract_many`` writes the same layout once per client organisation, below
``{base_path}/{conn_id made path-safe}/`` (:func:`organisation_base_path`).

``date`` is the run's logical date (``run_after`` for a manual run without one) as
``YYYY-MM-DD``. A rerun of March in June, a manual run beside the scheduled one, a
half-failed rerun: each lands in its own run folder, or (a cleared run, same run id)
loses its manifest first and gets it back only when every file is there again.

Readers call :func:`latest_complete_snapshot` (or :func:`read_manifest` on a folder they
know) and read only the files the manifest lists. Works on local paths and on
object storage (``ObjectStoragePath`` or URL strings such as ``s3://conn@bucket/prefix``).
"""

from __future__ import annotations

import json
import os
import re
from datetime import date as date_type
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_papertrail.api.sink import Sink

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

MANIFEST_NAME = "_MANIFEST.json"
MANIFEST_FORMAT = 1
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_DATE_FOLDER = re.compile(r"^\d{4}-\d{2}-\d{2}$")


# ---------------------------------------------------------------------------------------
# naming
# ---------------------------------------------------------------------------------------
def path_safe(value: Any) -> str:
    """``scheduled__2024-03-01T00:00:00+00:00`` -> ``scheduled__2024-03-01T00_00_00_00_00``.

    Keeps ``[A-Za-z0-9._-]`` and replaces every other character by ``_``: ``:`` and ``+``
    break Hadoop/Spark paths, ``/`` would nest folders. ``""``, ``.`` and ``..`` become
    underscores too, so the result is always one ordinary path segment.
    """
    safe = _UNSAFE.sub("_", str(value))
    return "_" * max(1, len(safe)) if safe in ("", ".", "..") else safe


def snapshot_folder(base_path: Any, when: datetime | date_type | str, run_id: str) -> str:
    """``{base_path}/{YYYY-MM-DD}/{path_safe(run_id)}`` as a string (a local path or a URL).

    :param when: the logical date (or ``run_after`` for a manual run), a date, or an
        already formatted ``YYYY-MM-DD``.
    """
    day = when if isinstance(when, str) else when.strftime("%Y-%m-%d")
    return f"{str(base_path).rstrip('/')}/{day}/{path_safe(run_id)}"


def organisation_base_path(base_path: Any, conn_id: str) -> str:
    """``{base_path}/{path_safe(conn_id)}``: the base path of one client organisation's snapshots.

    ``papertrail_extract_many`` writes each organisation's runs below its own folder, so
    ``latest_complete_snapshot(organisation_base_path(base_path, conn_id))`` finds that
    organisation's newest complete snapshot.
    """
    return f"{str(base_path).rstrip('/')}/{path_safe(conn_id)}"


# ---------------------------------------------------------------------------------------
# data-interval templates in query_params (a Jinja filter for the example DAG)
# ---------------------------------------------------------------------------------------
_INTERVAL_NAMES = ("data_interval_start", "data_interval_end", "logical_date", "run_after", "ds", "ts", "run_id")


def _interval_env() -> Any:
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)

    def ds(value: Any) -> str | None:
        return None if value is None else value.strftime("%Y-%m-%d")

    def ds_nodash(value: Any) -> str | None:
        return None if value is None else value.strftime("%Y%m%d")

    def ts(value: Any) -> str | None:
        return None if value is None else value.isoformat()

    env.filters.update(ds=ds, ds_nodash=ds_nodash, ts=ts)
    return env


def _interval_templates(context: Any, params: Mapping[str, Any] | None) -> dict[str, Any]:
    values = {name: context.get(name) for name in _INTERVAL_NAMES}
    dag_run = context.get("dag_run")
    if values["run_after"] is None and dag_run is not None:
        values["run_after"] = getattr(dag_run, "run_after", None)
    env = _interval_env()
    out: dict[str, Any] = {}
    for name, value in (params or {}).items():
        if isinstance(value, str) and ("{{" in value or "{%" in value):
            value = env.from_string(value).render(values)
        out[name] = value
    return out


def _make_interval_filter() -> Any:
    from jinja2 import pass_context

    return pass_context(_interval_templates)


#: Jinja filter ``interval_templates``: renders the string values of a mapping (the
#: ``query_params`` param, typically from the trigger conf) with only the run's dates in
#: scope: ``data_interval_start``, ``data_interval_end``, ``logical_date``, ``run_after``,
#: ``ds``, ``ts``, ``run_id`` and the filters ``ds``, ``ds_nodash``, ``ts``. Not Airflow's
#: full template context: a trigger conf must not be able to read ``conn``/``var`` secrets
#: into a query string or a manifest.
interval_templates = _make_interval_filter()


# ---------------------------------------------------------------------------------------
# locations: a local folder or a folder in an object store
# ---------------------------------------------------------------------------------------
class _Folder:
    """Just enough of a folder for manifests: join, list, size, read, remove."""

    def __init__(self, location: Any) -> None:
        self.original = location
        self.local: Path | None = None
        self.fs: Any = None
        self.path = ""
        if isinstance(location, (str, os.PathLike)) and "://" not in os.fspath(location):
            self.local = Path(os.fspath(location))
            return
        target = location
        if isinstance(location, str):
            from airflow.sdk import ObjectStoragePath

            target = ObjectStoragePath(location)
        if getattr(target, "protocol", None) in ("file", "local"):
            self.local = Path(str(target.path))
            return
        self.target = target
        self.fs = target.fs
        self.path = str(target.path).rstrip("/")

    def child(self, name: str) -> Any:
        """A destination for :class:`Sink` / a location for :class:`_Folder`, same kind as the original."""
        if self.local is not None:
            joined = self.local / name
            return joined if isinstance(self.original, Path) else str(joined)
        if isinstance(self.original, str):
            return f"{self.original.rstrip('/')}/{name}"
        return self.target / name

    def _full(self, name: str) -> str:
        return f"{self.path}/{name}"

    def size(self, name: str) -> int | None:
        try:
            if self.local is not None:
                return (self.local / name).stat().st_size
            info = self.fs.info(self._full(name))
        except (FileNotFoundError, NotADirectoryError):
            return None
        if info.get("type") == "directory":
            return None
        return int(info["size"])

    def mtime(self, name: str) -> str | None:
        """The storage's modification time of ``name`` (ISO 8601, UTC), when it keeps one."""
        try:
            if self.local is not None:
                stamp: Any = (self.local / name).stat().st_mtime
            else:
                info = self.fs.info(self._full(name))
                stamp = next(
                    (info[k] for k in ("mtime", "LastModified", "last_modified", "updated") if k in info), None
                )
        except (FileNotFoundError, NotADirectoryError):
            return None
        if isinstance(stamp, (int, float)):
            return datetime.fromtimestamp(stamp, tz=timezone.utc).isoformat()
        if isinstance(stamp, datetime):
            return (stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)).astimezone(timezone.utc).isoformat()
        return str(stamp) if stamp is not None else None

    def read_bytes(self, name: str) -> bytes | None:
        try:
            if self.local is not None:
                return (self.local / name).read_bytes()
            return bytes(self.fs.cat_file(self._full(name)))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def remove(self, name: str) -> bool:
        try:
            if self.local is not None:
                (self.local / name).unlink()
            else:
                if not self.fs.exists(self._full(name)):
                    return False
                self.fs.rm(self._full(name))
        except FileNotFoundError:
            return False
        return True

    def subfolders(self) -> list[str]:
        """Names of the folders directly inside (none when it does not exist)."""
        try:
            if self.local is not None:
                return sorted(p.name for p in self.local.iterdir() if p.is_dir())
            entries = self.fs.ls(self.path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        names = {str(e["name"]).rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"}
        return sorted(names)


# ---------------------------------------------------------------------------------------
# manifests
# ---------------------------------------------------------------------------------------
def remove_stale_manifest(folder: Any) -> bool:
    """Delete ``_MANIFEST.json`` from a run folder before its files are written again.

    The first task of a run: a cleared run keeps its run id (and folder), and the old
    manifest must not vouch for files that are about to be replaced. Returns whether one
    was there.
    """
    return _Folder(folder).remove(MANIFEST_NAME)


def write_manifest(
    folder: Any,
    files: Iterable[Mapping[str, Any]],
    *,
    query_params: Mapping[str, Any] | None,
    conn_id: str | None,
    dag_id: str | None,
    run_id: str | None,
    logical_date: datetime | str | None,
    data_interval: tuple[datetime | str | None, datetime | str | None] | None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``folder/_MANIFEST.json`` (last, atomically: temporary name + rename) and return it.

    :param files: one mapping per file, as the extract tasks push to XCom
        (``{"path", "records", "bytes"}``) plus ``module`` and ``query``. Every file must
        be in ``folder`` with exactly ``bytes`` bytes, or :class:`ValueError` is raised and
        no manifest is written.
    :param query_params: the query-string parameters the extractions sent.
    :param extra: more top-level members (they cannot replace the standard ones).
    """
    from airflow_papertrail import __version__

    location = _Folder(folder)
    entries: list[dict[str, Any]] = []
    for item in files:
        name = str(item["path"]).rstrip("/").rsplit("/", 1)[-1]
        expected = int(item["bytes"])
        actual = location.size(name)
        if actual != expected:
            raise ValueError(
                f"{name} in {folder} is {'missing' if actual is None else f'{actual} bytes'}, "
                f"the extraction reported {expected} bytes: no manifest written"
            )
        entries.append(
            {
                "name": name,
                "path": str(item["path"]),
                "module": item.get("module"),
                "query": item.get("query"),
                "records": int(item["records"]),
                "bytes": expected,
                "written_at": location.mtime(name),
            }
        )
    entries.sort(key=lambda e: e["name"])
    start, end = data_interval if data_interval else (None, None)
    manifest: dict[str, Any] = {
        **(dict(extra) if extra else {}),
        "format": MANIFEST_FORMAT,
        "files": entries,
        "query_params": dict(query_params or {}),
        "conn_id": conn_id,
        "dag_id": dag_id,
        "run_id": run_id,
        "logical_date": _iso(logical_date),
        "data_interval": {"start": _iso(start), "end": _iso(end)},
        "provider_version": __version__,
        "manifest_written_at": datetime.now(timezone.utc).isoformat(),
    }
    body = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")
    sink = Sink(location.child(MANIFEST_NAME))
    with sink.open() as fh:
        fh.write(body)
    sink.commit()
    return manifest


def read_manifest(folder: Any) -> dict[str, Any] | None:
    """The manifest of a run folder, or ``None`` when it has none (incomplete or not a run)."""
    raw = _Folder(folder).read_bytes(MANIFEST_NAME)
    if raw is None:
        return None
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), list) else None


def is_complete(folder: Any, manifest: Mapping[str, Any] | None = None) -> bool:
    """Whether ``folder`` has a manifest and every file it lists exists with the recorded size."""
    manifest = manifest if manifest is not None else read_manifest(folder)
    if manifest is None:
        return False
    location = _Folder(folder)
    try:
        return all(location.size(str(f["name"])) == int(f["bytes"]) for f in manifest["files"])
    except (KeyError, TypeError, ValueError):
        return False


def latest_complete_snapshot(base_path: Any, date: datetime | date_type | str | None = None) -> Any:
    """The newest complete run folder under ``base_path``, or ``None``.

    Dates are searched newest first (``date`` restricts the search to that day); within a
    day, the complete run whose manifest was written last wins. Complete means: the
    manifest exists and every file it lists exists with exactly the recorded size.

    :returns: the run folder, of the same kind as ``base_path`` (``str``, ``Path`` or
        ``ObjectStoragePath``); read the manifest with :func:`read_manifest`.
    """
    base = _Folder(base_path)
    if date is not None:
        days = [date if isinstance(date, str) else date.strftime("%Y-%m-%d")]
    else:
        days = sorted((d for d in base.subfolders() if _DATE_FOLDER.match(d)), reverse=True)
    for day in days:
        day_location = base.child(day)
        best: tuple[str, Any] | None = None
        for run in _Folder(day_location).subfolders():
            folder = _Folder(day_location).child(run)
            manifest = read_manifest(folder)
            if manifest is None or not is_complete(folder, manifest):
                continue
            written = str(manifest.get("manifest_written_at") or "")
            if best is None or written > best[0]:
                best = (written, folder)
        if best is not None:
            return best[1]
    return None


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


__all__ = [
    "MANIFEST_NAME",
    "interval_templates",
    "is_complete",
    "latest_complete_snapshot",
    "organisation_base_path",
    "path_safe",
    "read_manifest",
    "remove_stale_manifest",
    "snapshot_folder",
    "write_manifest",
]
