"""SQLite storage of raters and answers: WAL, one connection per request, and
``BEGIN IMMEDIATE`` writes, so concurrent raters serialise instead of colliding and an
answer is on disk before the next image is served."""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DB_FILE = "ratings.db"
CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no look-alikes (0/O, 1/I)
CODE_LENGTH = 8

SCHEMA = """
CREATE TABLE IF NOT EXISTS raters (
    id INTEGER PRIMARY KEY,
    code TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    created TEXT NOT NULL DEFAULT (datetime('now'))
);
CREATE TABLE IF NOT EXISTS answers (
    rater_id INTEGER NOT NULL REFERENCES raters(id),
    position INTEGER NOT NULL,
    item INTEGER NOT NULL,
    score INTEGER NOT NULL CHECK (score BETWEEN 1 AND 5),
    guess TEXT CHECK (guess IN ('real', 'synthetic')),
    answered TEXT NOT NULL DEFAULT (datetime('now')),
    PRIMARY KEY (rater_id, position)
);
CREATE TABLE IF NOT EXISTS orders (
    rater_id INTEGER PRIMARY KEY REFERENCES raters(id),
    sequence TEXT NOT NULL
);
"""
# A rater's order of items (JSON list), drawn once when they join: redrawn on every visit,
# another NumPy could shuffle it otherwise half-way through their study.
Order = Callable[[int], list[int]]


class PositionTaken(Exception):
    """The rater already answered this position (a replayed or double-submitted form)."""


class WrongPosition(Exception):
    """The answer is not for the rater's current position."""


@dataclass(frozen=True)
class Rater:
    id: int
    code: str
    name: str


@dataclass(frozen=True)
class Answer:
    rater: str  # "R001", "R002"... in joining order: the code is a rater's only credential
    position: int
    item: int
    score: int
    guess: str | None


def connect(study_root: str | Path) -> sqlite3.Connection:
    # isolation_level=None: transactions are explicit, so BEGIN IMMEDIATE means what it says.
    conn = sqlite3.connect(Path(study_root) / DB_FILE, timeout=30.0, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def init_db(study_root: str | Path) -> None:
    path = Path(study_root) / DB_FILE
    new = not path.exists()
    conn = connect(study_root)
    try:
        conn.executescript(SCHEMA)
    finally:
        conn.close()
    if new:  # rater codes are credentials: another user of the machine could answer as one
        os.chmod(path, 0o600)


def create_rater(conn: sqlite3.Connection, name: str, order: Order) -> Rater:
    """A new rater with a fresh code and their order of items, ``order(rater id)``."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        while True:
            code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
            if conn.execute("SELECT 1 FROM raters WHERE code = ?", (code,)).fetchone() is None:
                break
        cursor = conn.execute("INSERT INTO raters (code, name) VALUES (?, ?)", (code, name))
        rater_id = int(cursor.lastrowid or 0)
        _store_order(conn, rater_id, order)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return Rater(rater_id, code, name)


def _store_order(conn: sqlite3.Connection, rater_id: int, order: Order) -> None:
    conn.execute(
        "INSERT OR IGNORE INTO orders (rater_id, sequence) VALUES (?, ?)",
        (rater_id, json.dumps(order(rater_id))),
    )


def rater_order(conn: sqlite3.Connection, rater: Rater, order: Order) -> list[int]:
    """The order ``rater`` sees items in, as stored when they joined (drawn and stored now
    for a rater of a database from before orders were stored)."""
    row = conn.execute("SELECT sequence FROM orders WHERE rater_id = ?", (rater.id,)).fetchone()
    if row is None:
        _store_order(conn, rater.id, order)
        return rater_order(conn, rater, order)
    return [int(i) for i in json.loads(row[0])]


def find_rater(conn: sqlite3.Connection, code: str) -> Rater | None:
    row = conn.execute("SELECT id, code, name FROM raters WHERE code = ?", (code,)).fetchone()
    return Rater(*row) if row else None


def next_position(conn: sqlite3.Connection, rater: Rater) -> int:
    """Answers are only accepted in order, so the count of answers is the next position."""
    (count,) = conn.execute(
        "SELECT COUNT(*) FROM answers WHERE rater_id = ?", (rater.id,)
    ).fetchone()
    return int(count)


def record_answer(
    conn: sqlite3.Connection,
    rater: Rater,
    position: int,
    item: int,
    score: int,
    guess: str | None,
) -> None:
    """Commit one answer; raises PositionTaken or WrongPosition for out-of-order answers."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = next_position(conn, rater)
        if position < current:
            raise PositionTaken(position)
        if position != current:
            raise WrongPosition(position)
        conn.execute(
            "INSERT INTO answers (rater_id, position, item, score, guess) VALUES (?, ?, ?, ?, ?)",
            (rater.id, position, item, score, guess),
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def all_answers(study_root: str | Path) -> list[Answer]:
    conn = connect(study_root)
    try:
        rows = conn.execute(
            "SELECT r.id, a.position, a.item, a.score, a.guess FROM answers a "
            "JOIN raters r ON r.id = a.rater_id ORDER BY r.id, a.position"
        ).fetchall()
    finally:
        conn.close()
    # Numbered among the raters who answered, in joining order: one who enrolled twice (a
    # double click) or never began leaves no gap.
    number = {rater: n for n, rater in enumerate(dict.fromkeys(r[0] for r in rows), start=1)}
    return [Answer(f"R{number[rater]:03d}", *rest) for rater, *rest in rows]
