"""Arrival traces in the public formats, one loader for the simulator, the twin and the Locust
trace shape.

* Azure LLM inference 2023: CSV ``TIMESTAMP,ContextTokens,GeneratedTokens`` (timestamps like
  ``2023-11-16 18:15:46.6805900``);
* BurstGPT: CSV ``Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type``
  (seconds from the start);
* Mooncake: JSON lines ``{"timestamp": ms, "input_length", "output_length", "hash_ids": [...]}``;
  each hash id names one 512-token block of the prompt, so requests that share leading ids
  share a prefix (what vLLM's prefix cache can reuse);
* plain: CSV ``arrival_s,prompt_tokens,output_tokens``.

Times come back in seconds from the first arrival, sorted (stable). A malformed row raises a
ValueError naming the file and the line.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

MOONCAKE_BLOCK = 512  # tokens per hash id in the Mooncake traces
CSV_FORMATS: dict[tuple[str, ...], str] = {
    ("TIMESTAMP", "ContextTokens", "GeneratedTokens"): "azure",
    ("arrival_s", "prompt_tokens", "output_tokens"): "plain",
    ("Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type"): "burstgpt",
}


@dataclass
class Trace:
    arrival_s: np.ndarray  # (n,) float, from 0, non-decreasing
    prompt_tokens: np.ndarray  # (n,) int
    output_tokens: np.ndarray  # (n,) int
    hash_ids: list[list[int]] | None = None  # Mooncake: the prompt's block ids
    format: str = ""

    def __len__(self) -> int:
        return int(self.arrival_s.shape[0])

    def prompt_ids(self, i: int, vocab: int, block: int = MOONCAKE_BLOCK) -> list[int]:
        """Token ids for request ``i``'s prompt: with hash ids, each block's ids derive from its
        hash (equal ids, equal tokens: a shared prefix); without, from the request's index."""
        n = int(self.prompt_tokens[i])
        if self.hash_ids is None:
            return np.random.default_rng([i, 7]).integers(1, vocab, size=n).tolist()
        out: list[int] = []
        for h in self.hash_ids[i]:
            out += np.random.default_rng([int(h), 11]).integers(1, vocab, size=block).tolist()
            if len(out) >= n:
                break
        if len(out) < n:  # a prompt longer than its blocks: a private tail
            out += np.random.default_rng([i, 13]).integers(1, vocab, size=n - len(out)).tolist()
        return out[:n]


def parse_time(text: str) -> float:
    """Seconds: a plain number, or a timestamp like Azure's '2023-11-16 18:15:46.6805900'."""
    try:
        return float(text)
    except ValueError:
        pass
    head, _, frac = text.strip().partition(".")
    stamp = datetime.strptime(head, "%Y-%m-%d %H:%M:%S").timestamp()
    if frac and not frac.isdigit():
        raise ValueError(f"bad fraction of a second in {text!r}")
    return stamp + (float("0." + frac) if frac else 0.0)


def _check(t: float, p: int, o: int) -> None:
    if not np.isfinite(t) or p < 0 or o < 0:
        raise ValueError("times must be finite and token counts >= 0")


def _csv(path: Path) -> tuple[str, list[tuple[float, int, int]]]:
    rows = []
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = tuple(c.strip() for c in next(reader, ()))
        fmt = CSV_FORMATS.get(header)
        if fmt is None:
            raise ValueError(
                f"{path}:1: expected a header of {' or '.join(map(','.join, CSV_FORMATS))}, got {','.join(header)!r}"
            )
        cols = (0, 2, 3) if fmt == "burstgpt" else (0, 1, 2)
        for row in reader:
            line = reader.line_num
            if not row or not "".join(row).strip():
                continue
            try:
                if len(row) != len(header):
                    raise ValueError(f"expected {len(header)} fields, got {len(row)}")
                t, p, o = parse_time(row[cols[0]]), int(row[cols[1]]), int(row[cols[2]])
                _check(t, p, o)
            except ValueError as exc:
                raise ValueError(f"{path}:{line}: malformed trace row {row!r}: {exc}") from None
            rows.append((t, p, o))
    return fmt, rows


def _mooncake(path: Path) -> tuple[list[tuple[float, int, int]], list[list[int]]]:
    rows, hashes = [], []
    with path.open() as f:
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                r = json.loads(text)
                if not isinstance(r, dict):
                    raise ValueError("not a JSON object")
                t, p, o = float(r["timestamp"]) / 1000.0, int(r["input_length"]), int(r["output_length"])
                h = r.get("hash_ids", [])
                if not isinstance(h, list) or not all(isinstance(x, int) for x in h):
                    raise ValueError("hash_ids must be a list of integers")
                _check(t, p, o)
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{line}: malformed Mooncake row: {exc!r}") from None
            rows.append((t, p, o))
            hashes.append(h)
    return rows, hashes


def load_trace(path: str | Path) -> Trace:
    """A trace in any of the formats above (JSON lines: Mooncake; CSV: by its header)."""
    path = Path(path)
    hashes = None
    if path.suffix in (".jsonl", ".json"):
        fmt = "mooncake"
        rows, hashes = _mooncake(path)
    else:
        fmt, rows = _csv(path)
    if not rows:
        raise ValueError(f"{path}: no requests in trace")
    t = np.array([r[0] for r in rows])
    order = np.argsort(t, kind="stable")
    t = t[order] - t[order[0]]
    return Trace(
        t,
        np.array([r[1] for r in rows], dtype=np.int64)[order],
        np.array([r[2] for r in rows], dtype=np.int64)[order],
        [hashes[i] for i in order] if hashes is not None else None,
        fmt,
    )
