"""The results store: one SQLite file per output folder that loses nothing.

Every finished (or diverged) run is one row written in one transaction: its id (a hash of its
config, so a run is never stored twice), group label, config, environment, curve, final metrics and
status. WAL journaling and a busy timeout make it safe for several processes writing at once; a
kill at any moment leaves either the whole row or none of it.
"""

from __future__ import annotations

import csv
import json
import sqlite3
import time
from pathlib import Path

__all__ = ["Store", "StoreError"]


class StoreError(ValueError):
    """A results folder that cannot be read or reported: not a normlab database, or no finished runs."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    experiment TEXT NOT NULL,
    grp TEXT NOT NULL,
    method TEXT NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('done', 'diverged')),
    diverged_at INTEGER,
    final_test_acc REAL,
    final_test_loss REAL,
    wall_s REAL,
    config TEXT NOT NULL,
    env TEXT NOT NULL,
    curve TEXT NOT NULL,
    finished_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

COLUMNS = ("id", "experiment", "grp", "method", "seed", "status", "diverged_at", "final_test_acc",
           "final_test_loss", "wall_s")


class Store:
    """The runs of one output folder, in ``<folder>/runs.db``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "runs.db"
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            self.db.close()
            raise StoreError(f"{self.path} is not a normlab results database ({e}); move it away or pass "
                             "another folder") from None

    def close(self) -> None:
        """Close the database (also on leaving a ``with Store(...)`` block)."""
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_meta(self, key: str, value: object) -> None:
        """Store a JSON value under ``key`` (the experiment definition, for rebuilding reports)."""
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def meta(self, key: str, default: object = None) -> object:
        """The JSON value stored under ``key`` by :meth:`set_meta`, or ``default``."""
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def done_ids(self) -> set[str]:
        """Ids of every stored run."""
        return {r[0] for r in self.db.execute("SELECT id FROM runs")}

    def add(self, run_id: str, experiment: str, group: str, result: dict) -> None:
        """Record one finished run (``RunResult.to_dict()``) in one transaction; a repeat is ignored."""
        cfg, final = result["config"], result.get("final") or {}
        status = "diverged" if result.get("diverged_at") is not None else "done"
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute(
                "INSERT OR IGNORE INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (run_id, experiment, group, cfg["method"], cfg["seed"], status, result.get("diverged_at"),
                 final.get("test_acc"), final.get("test_loss"), result.get("wall_s"), json.dumps(cfg),
                 json.dumps(result.get("env", {})), json.dumps(result["curve"]), time.time()))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def runs(self, where: dict | None = None, *, current: bool = False) -> list[dict]:
        """Every stored run as a dict (config, curve and env decoded), filtered by column equality;
        with ``current``, only the runs of the experiment last run into the folder (a folder reused
        with other settings keeps the older runs)."""
        sql, args = "SELECT * FROM runs", []
        if where:
            bad = sorted(set(where) - set(COLUMNS))
            if bad:
                raise ValueError(f"cannot filter on {bad}; columns: {list(COLUMNS)}")
            sql += " WHERE " + " AND ".join(f"{k} = ?" for k in where)
            args = list(where.values())
        cur = self.db.execute(sql + " ORDER BY grp, seed", args)
        names = [d[0] for d in cur.description]
        out = []
        for row in cur:
            rec = dict(zip(names, row))
            for key in ("config", "env", "curve"):
                rec[key] = json.loads(rec[key])
            out.append(rec)
        ids = self.meta("run_ids", None) if current else None
        if ids is None:
            return out
        keep = set(ids)
        return [r for r in out if r["id"] in keep]

    def to_csv(self, path: str | Path, where: dict | None = None, *, current: bool = False) -> int:
        """Write the summary columns plus the flattened config of each run to ``path`` (``current``: see
        :meth:`runs`); returns the count."""
        rows = self.runs(where, current=current)
        cfg_keys = sorted({k for r in rows for k in r["config"]} - {"method", "seed"})
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow([*COLUMNS, *cfg_keys])
            for r in rows:
                w.writerow([r[c] for c in COLUMNS] +
                           [json.dumps(r["config"][k]) if isinstance(r["config"].get(k), dict) else r["config"].get(k)
                            for k in cfg_keys])
        return len(rows)
