"""Read one source's raw rows: a local jsonl/json/parquet file, an arrow folder, an HF hub id, or a generator.

Files go through `datasets`' Arrow readers (fast, memory-mapped, cached). When the JSON reader fails (a malformed
line, or a column whose type changes between rows), the file is read again line by line so that the error can
name the exact row; with ``on_bad_row=skip`` the unreadable rows are dropped and counted instead. A row of a JSON
lines file is named by its 1-based line number, as an editor shows it (blank lines count), in one short
`BadRowError` (no chained reader tracebacks); rows of other sources by their 1-based row number.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from stagewise.data.schema import BadRowError
from stagewise.tracking.logs import quiet_loggers

GENERATOR_PREFIX = "generator:"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class RawSource:
    """Either an Arrow ``dataset`` or, after a reader fallback, plain python ``rows`` (already read and checked)."""

    kind: str  # generator | json | parquet | arrow | hub
    dataset: Dataset | None = None
    rows: list[dict[str, Any]] | None = None
    row_ids: list[int] | None = None  # each python row's index in the file
    skipped: int = 0
    errors: list[str] = field(default_factory=list)
    path: str | None = None  # a JSON lines file: rows are located by line (`location`)
    _lines: list[int] | None = field(default=None, repr=False)

    def location(self, row: int) -> str:
        """Where the 0-based ``row`` (a ``row_ids`` entry, or an Arrow row index) is: ``line 8`` in a JSON lines
        file (1-based, blank lines counted), else ``row 8`` (1-based)."""
        if self.path is not None and self._lines is None:
            self._lines = json_lines_rows(self.path)
        if self._lines is not None and 0 <= row < len(self._lines):
            return f"line {self._lines[row]}"
        return f"row {row + 1}"

    @property
    def num_rows(self) -> int:
        return len(self.dataset) if self.dataset is not None else len(self.rows or []) + self.skipped


def source_kind(path: str) -> str:
    if path.startswith(GENERATOR_PREFIX):
        return "generator"
    p = Path(path).expanduser()
    if p.is_dir():
        return "arrow"
    if p.suffix in (".jsonl", ".json") or p.name.endswith((".jsonl.gz", ".json.gz")):
        return "json" if p.exists() else _missing(path)
    if p.suffix == ".parquet":
        return "parquet" if p.exists() else _missing(path)
    if not p.exists() and _HUB_ID.match(path):
        return "hub"
    if p.exists():
        raise ValueError(f"data source {path!r}: unsupported file type {p.suffix!r} (use .jsonl, .json, .parquet, "
                         "an arrow folder from Dataset.save_to_disk, an HF hub id, or generator:<name>)")
    return _missing(path)


def _missing(path: str) -> str:
    raise FileNotFoundError(f"data source {path!r} does not exist (and is not an HF hub id of the form org/name)")


def source_stem(path: str) -> str:
    """Default report name of a source: the generator name, file stem, folder name, or hub id's last part."""
    if path.startswith(GENERATOR_PREFIX):
        return path[len(GENERATOR_PREFIX):]
    name = Path(path.rstrip("/")).name
    for suffix in (".gz", ".jsonl", ".json", ".parquet"):
        name = name.removesuffix(suffix)
    return name


def _open_text(path: str):
    p = Path(path).expanduser()
    return gzip.open(p, "rt") if p.name.endswith(".gz") else open(p)


def is_json_lines(path: str) -> bool:
    """A .jsonl file, or a .json file that is not one JSON array."""
    if ".jsonl" in Path(path).name:
        return True
    with _open_text(path) as f:
        head = f.read(4096).lstrip()
    return not head.startswith("[")


def json_lines_rows(path: str) -> list[int] | None:
    """The 1-based line number of each row of a JSON lines file (its non-blank lines), or None for a JSON array."""
    if not is_json_lines(path):
        return None
    with _open_text(path) as f:
        return [n for n, line in enumerate(f, 1) if line.strip()]


def _quiet_json_reader():
    """``datasets`` logs the Arrow JSON reader's failure at ERROR ("Failed to load JSON ... in row 7", 0-based)
    before raising; the line-by-line fallback reports it better, so that record is dropped."""
    return quiet_loggers("datasets.packaged_modules.json.json", level=logging.CRITICAL)


def read_source(path: str, split: str, *, seed: int, generator_kwargs: dict[str, Any], on_bad_row: str,
                cache_dir: str | None = None) -> RawSource:
    kind = source_kind(path)
    if kind == "generator":
        from stagewise.data.generators import GENERATORS

        name = path[len(GENERATOR_PREFIX):]
        if name not in GENERATORS:
            raise ValueError(f"data source {path!r}: unknown generator {name!r} (available: {', '.join(GENERATORS)})")
        kwargs = dict(generator_kwargs)
        kwargs.setdefault("seed", seed)
        return RawSource(kind, dataset=Dataset.from_list(GENERATORS[name](split=split, **kwargs)))
    if kind == "parquet":
        return RawSource(kind, dataset=Dataset.from_parquet(str(Path(path).expanduser()), cache_dir=cache_dir))
    if kind == "arrow":
        loaded = load_from_disk(str(Path(path).expanduser()))
        if isinstance(loaded, DatasetDict):
            if split not in loaded:
                raise ValueError(f"data source {path!r} has splits {list(loaded)}, not {split!r}")
            loaded = loaded[split]
        return RawSource(kind, dataset=loaded)
    if kind == "hub":
        return RawSource(kind, dataset=load_dataset(path, split=split, cache_dir=cache_dir))
    try:
        with _quiet_json_reader():
            dataset = Dataset.from_json(str(Path(path).expanduser()), cache_dir=cache_dir)
    except Exception as arrow_error:  # noqa: BLE001 - any reader failure is diagnosed row by row below
        return read_json_rows(path, on_bad_row, arrow_error)
    return RawSource(kind, dataset=dataset, path=path)


def read_json_rows(path: str, on_bad_row: str, cause: Exception | None = None) -> RawSource:
    """Line-by-line JSON reader that names the bad row: invalid JSON, a non-object line, or a top-level column
    whose JSON type differs from the first row that has it. Nested type errors (a message content that is a list)
    are then caught row by row by the adapter, which is why these rows are returned as python objects.
    ``cause`` (the Arrow reader's error) is not chained: the row's message says all there is."""
    with _open_text(path) as f:
        text = f.read()
    entries: list[tuple[int, Any, str | None]] = []  # (row index, value, parse error)
    lines: list[int] | None = None
    if not is_json_lines(path):
        try:
            entries = [(i, v, None) for i, v in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise BadRowError(f"{path}: line {e.lineno}: invalid JSON at column {e.colno}: {e.msg}") from None
    else:
        lines = []
        for n, line in enumerate(text.split("\n"), 1):  # JSON lines are split at \n only (as `json_lines_rows`)
            if not line.strip():
                continue
            try:
                entries.append((len(lines), json.loads(line), None))
            except json.JSONDecodeError as e:
                entries.append((len(lines), None, f"field '<json>': invalid JSON: {e.msg} at column {e.colno}"))
            lines.append(n)
    where = RawSource("json", path=path if lines is not None else None, _lines=lines)
    rows: list[dict[str, Any]] = []
    row_ids: list[int] = []
    errors: list[str] = []
    types: dict[str, str] = {}
    for i, value, problem in entries:
        if problem is None and not isinstance(value, dict):
            problem = f"field '<json>': expected a JSON object, got {type(value).__name__}"
        if problem is None:
            for key, v in value.items():
                t = _json_type(v)
                if t is not None and types.setdefault(key, t) != t:
                    problem = f"field {key!r}: {t} here but {types[key]} in earlier rows"
                    break
        if problem is None:
            rows.append(value)
            row_ids.append(i)
            continue
        msg = f"{path}: {where.location(i)}: {problem}"
        if on_bad_row != "skip":
            raise BadRowError(msg + " (set data.on_bad_row=skip to skip bad rows)") from None
        errors.append(msg)
    if not rows and errors:
        raise BadRowError(f"{path}: no readable rows; first error: {errors[0]}") from None
    return RawSource("json", rows=rows, row_ids=row_ids, skipped=len(errors), errors=errors, path=where.path,
                     _lines=lines)


def _json_type(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}[type(v)]
