"""The server's state in SQLite: uploaded files, fine-tuning jobs, and their events.

Each row keeps its object as JSON (`doc`) beside the few columns that are queried; `seq` (insertion
order) makes listing and cursors (`after=<id>`) exact even when timestamps tie. One connection, used
under a lock from the request threads and the job worker; WAL journal, so a killed server keeps every
committed write (a restart loses nothing).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
from pathlib import Path

from grpo.api.errors import bad_request

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL,
                                  purpose TEXT NOT NULL, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL,
                                 status TEXT NOT NULL, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL,
                                   job_id TEXT NOT NULL, source TEXT NOT NULL, doc TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, seq);
"""


def new_id(prefix: str) -> str:
    """`<prefix><24 hex>`: random, so ids never collide across restarts."""
    return f"{prefix}{secrets.token_hex(12)}"


class Page(list):
    """A list of docs plus `has_more` (OpenAI's cursor pages)."""

    has_more: bool = False


class Store:
    def __init__(self, state_dir: str | Path):
        self.root = Path(state_dir)
        self.files_dir = self.root / "files"
        self.jobs_dir = self.root / "jobs"
        for d in (self.root, self.files_dir, self.jobs_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.db = sqlite3.connect(self.root / "server.sqlite3", check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        with self.lock:
            self.db.close()

    # -- generic ---------------------------------------------------------------------------
    def _one(self, table: str, ident: str) -> dict | None:
        with self.lock:
            row = self.db.execute(f"SELECT doc FROM {table} WHERE id = ?", (ident,)).fetchone()
        return json.loads(row[0]) if row else None

    def _page(self, table: str, where: str, args: tuple, *, limit: int, after: str | None,
              desc: bool = True, what: str = "object") -> Page:
        """Rows in seq order (newest first when desc), those after the row `after`, `limit` of them."""
        with self.lock:
            if after:
                row = self.db.execute(f"SELECT seq FROM {table} WHERE id = ? AND {where}", (after, *args)).fetchone()
                if row is None:
                    raise bad_request(f"after: no {what} with id '{after}' in this list", "after")
                where += f" AND seq {'<' if desc else '>'} ?"
                args = (*args, row[0])
            rows = self.db.execute(f"SELECT doc FROM {table} WHERE {where} ORDER BY seq {'DESC' if desc else 'ASC'} "
                                   "LIMIT ?", (*args, limit + 1)).fetchall()
        page = Page(json.loads(r[0]) for r in rows[:limit])
        page.has_more = len(rows) > limit
        return page

    # -- files -----------------------------------------------------------------------------
    def add_file(self, doc: dict) -> None:
        with self.lock:
            self.db.execute("INSERT INTO files (id, purpose, doc) VALUES (?, ?, ?)",
                            (doc["id"], doc["purpose"], json.dumps(doc)))

    def get_file(self, file_id: str) -> dict | None:
        return self._one("files", file_id)

    def list_files(self, *, purpose: str | None, limit: int, after: str | None, desc: bool) -> Page:
        where, args = ("purpose = ?", (purpose,)) if purpose else ("1 = 1", ())
        return self._page("files", where, args, limit=limit, after=after, desc=desc, what="file")

    def delete_file(self, file_id: str) -> bool:
        with self.lock:
            return self.db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount > 0

    # -- jobs ------------------------------------------------------------------------------
    def add_job(self, doc: dict) -> None:
        with self.lock:
            self.db.execute("INSERT INTO jobs (id, status, doc) VALUES (?, ?, ?)",
                            (doc["id"], doc["status"], json.dumps(doc)))

    def get_job(self, job_id: str) -> dict | None:
        return self._one("jobs", job_id)

    def update_job(self, job_id: str, **fields) -> dict:
        with self.lock:
            doc = self.get_job(job_id)
            doc.update(fields)
            self.db.execute("UPDATE jobs SET status = ?, doc = ? WHERE id = ?", (doc["status"], json.dumps(doc), job_id))
            return doc

    def list_jobs(self, *, limit: int, after: str | None) -> Page:
        return self._page("jobs", "1 = 1", (), limit=limit, after=after, what="fine-tuning job")

    def jobs_with_status(self, *statuses: str) -> list[dict]:
        """Oldest first (the queue's order)."""
        marks = ",".join("?" * len(statuses))
        with self.lock:
            rows = self.db.execute(f"SELECT doc FROM jobs WHERE status IN ({marks}) ORDER BY seq", statuses).fetchall()
        return [json.loads(r[0]) for r in rows]

    def all_jobs(self) -> list[dict]:
        with self.lock:
            rows = self.db.execute("SELECT doc FROM jobs ORDER BY seq").fetchall()
        return [json.loads(r[0]) for r in rows]

    # -- events ----------------------------------------------------------------------------
    def add_event(self, job_id: str, event: dict, source: str = "server") -> None:
        with self.lock:
            self.db.execute("INSERT OR IGNORE INTO events (id, job_id, source, doc) VALUES (?, ?, ?, ?)",
                            (event["id"], job_id, source, json.dumps(event)))

    def mirror_events(self, job_id: str, events: list[dict], source: str = "trainer") -> None:
        """Make the job's `source` events exactly `events` (a file's lines, in order): new ones are
        appended, ones no longer in the file (dropped by a resume's truncation) are deleted."""
        with self.lock:
            have = {r[0] for r in self.db.execute("SELECT id FROM events WHERE job_id = ? AND source = ?",
                                                  (job_id, source))}
            wanted = {e["id"] for e in events}
            stale = have - wanted
            self.db.execute("BEGIN")
            try:
                self.db.executemany("DELETE FROM events WHERE id = ?", [(i,) for i in stale])
                self.db.executemany("INSERT OR IGNORE INTO events (id, job_id, source, doc) VALUES (?, ?, ?, ?)",
                                    [(e["id"], job_id, source, json.dumps(e)) for e in events if e["id"] not in have])
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def list_events(self, job_id: str, *, limit: int, after: str | None) -> Page:
        return self._page("events", "job_id = ?", (job_id,), limit=limit, after=after, what="event")
