"""Reading the records of `data.source`, each with where it came from, so that an error names the file and line.

A record that cannot be read (a JSONL line that is not JSON, or not an object) is yielded with the reason
instead of raising, so that the caller decides between failing and skipping it (`data.skip_bad_rows`) in one
place for every kind of bad row. A file that cannot be read at all raises DataError.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lopt_dist.config import DataConfig
from lopt_dist.data.arithmetic import generate_arithmetic_rows
from lopt_dist.data.formats import DataError
from lopt_dist.paths import BUILTIN_PREFIX, LOCAL_SUFFIXES, local_path_reason, missing_path_message


@dataclass(frozen=True)
class Record:
    index: int  # position in the source from 0; unreadable records count too
    line: int | None  # line number in a JSON Lines file, from 1
    row: dict[str, Any] | None  # None when the record could not be read
    problem: str = ""  # why it could not be read

    def where(self) -> str:
        return f"row {self.index}" + (f" (line {self.line})" if self.line is not None else "")


def is_local_file(source: str) -> bool:
    return Path(source).suffix.lower() in LOCAL_SUFFIXES


def read_records(cfg: DataConfig, limit: int | None = None) -> Iterator[Record]:
    """The records of `cfg.source`, cut to `cfg.max_samples` and to `limit`.

    `limit` reads only the first records: a hub dataset is then streamed instead of downloaded in full.
    Local files hold a single split, so `cfg.split` and `cfg.hub_config` apply to hub datasets only.
    """
    count = min((n for n in (cfg.max_samples, limit) if n is not None), default=None)
    source = cfg.source
    if source.startswith(BUILTIN_PREFIX):
        records = _builtin(source[len(BUILTIN_PREFIX):], cfg, count)
    elif is_local_file(source):
        records = _local_file(Path(source).expanduser())
    else:
        records = _dataset(cfg, streaming=limit is not None)
    return records if count is None else itertools.islice(records, count)


def load_rows(cfg: DataConfig) -> list[dict[str, Any]]:
    """Every row of `cfg.source` (cut to `cfg.max_samples`); DataError naming the first one that cannot be read."""
    rows = []
    for record in read_records(cfg):
        if record.row is None:
            raise DataError(f"data.source {cfg.source} {record.where()}: {record.problem}")
        rows.append(record.row)
    return rows


def _builtin(name: str, cfg: DataConfig, count: int | None) -> Iterator[Record]:
    if name != "arithmetic":
        raise DataError(f"data.source: unknown built-in dataset {BUILTIN_PREFIX}{name}; known: builtin:arithmetic")
    # The generator is sequential, so generating fewer rows gives exactly the first rows of the full set.
    rows = generate_arithmetic_rows(min(cfg.builtin_samples, count or cfg.builtin_samples), cfg.seed)
    return (Record(i, None, row) for i, row in enumerate(rows))


def _local_file(path: Path) -> Iterator[Record]:
    if not path.is_file():
        raise DataError(
            f"data.source: file {path} does not exist (give a .jsonl/.json/.parquet file, a hub dataset name, "
            f"or builtin:arithmetic)"
        )
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet(path)
    if suffix == ".json":
        return _json(path)
    return _json_lines(path)


def _json_lines(path: Path) -> Iterator[Record]:
    index = 0
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            row, problem = _json_object(raw)
            yield Record(index, number, row, problem)
            index += 1


def _json_object(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        return None, f"not UTF-8 text ({err.reason} at byte {err.start})"
    except json.JSONDecodeError as err:
        return None, f"not valid JSON ({err.msg} at column {err.colno})"
    if not isinstance(value, dict):
        return None, f"a JSON {type(value).__name__}, not an object with the row's columns"
    return value, ""


def _json(path: Path) -> Iterator[Record]:
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"data.source {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # one object per line in a .json file: read it as JSON Lines
            return _json_lines(path)
        raise DataError(
            f"data.source {path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); a .json "
            "file is read as a whole, so a syntax error there cannot be skipped: fix it (or write the rows as "
            "JSON Lines, one object per line, where data.skip_bad_rows can skip a bad line)"
        ) from None
    if not isinstance(value, list):
        raise DataError(f"data.source {path}: holds a JSON {type(value).__name__}; expected an array of row "
                        "objects (or one object per line)")
    return (Record(i, None, *_as_row(item)) for i, item in enumerate(value))


def _as_row(item: Any) -> tuple[dict[str, Any] | None, str]:
    if isinstance(item, dict):
        return item, ""
    return None, f"a JSON {type(item).__name__}, not an object with the row's columns"


def _parquet(path: Path) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"data.source {path}: not a readable Parquet file ({err})") from None
    index = 0
    for batch in table.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield Record(index, None, row)
            index += 1


def _dataset(cfg: DataConfig, streaming: bool) -> Iterator[Record]:
    """A hub dataset, or a local dataset directory that `datasets` can read; `streaming` reads only what is used."""
    source = cfg.source
    if not Path(source).expanduser().exists() and (reason := local_path_reason(source)):
        raise DataError(f"data.source: {missing_path_message(source, reason, 'file or directory')}")
    try:
        loaded = _load_dataset(cfg, streaming)
    except DataError:
        if not streaming:
            raise
        loaded = _load_dataset(cfg, streaming=False)  # e.g. offline, with the dataset in the local cache only
    return (Record(i, None, row) for i, row in enumerate(loaded))


def _load_dataset(cfg: DataConfig, streaming: bool) -> Any:
    import datasets

    try:
        return datasets.load_dataset(cfg.source, cfg.hub_config, split=cfg.split, streaming=streaming)
    except Exception as err:  # datasets and the hub client raise many types; each means "cannot load it"
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DataError(
            f"data.source {cfg.source!r} (hub_config {cfg.hub_config!r}, split {cfg.split!r}): cannot load it as a "
            f"dataset ({type(err).__name__}: {first}). Give a .jsonl/.json/.parquet file, an existing hub dataset "
            "with its data.hub_config and data.split, or builtin:arithmetic"
        ) from err
