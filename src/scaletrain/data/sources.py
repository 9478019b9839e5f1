"""Corpus sources: resolve ``data.source`` to files and read documents from them.

A source is a file, a directory (every file below it, recursively), a glob, or
``stdlib``: the .py files of the running interpreter's standard library, real
text every machine has.
"""

from __future__ import annotations

import glob
import json
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from scaletrain.errors import UserError

FORMAT_BY_SUFFIX = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


@dataclass
class ReadStats:
    """What reading a corpus passed over: said in one warning, never silently."""

    binary_files: list[Path] = field(default_factory=list)  # skipped: a NUL byte in the first 8 KiB
    replaced_chars: int = 0  # bytes that are not valid UTF-8, read as U+FFFD
    files_with_replacements: int = 0

    def warning(self, n_files: int) -> str | None:
        parts = []
        if self.binary_files:
            parts.append(f"skipped {len(self.binary_files)} of {n_files} file(s) as binary "
                         f"(e.g. {self.binary_files[0]})")
        if self.replaced_chars:
            parts.append(f"replaced {self.replaced_chars} invalid UTF-8 byte sequence(s) in "
                         f"{self.files_with_replacements} file(s) with U+FFFD")
        return "data.source: " + "; ".join(parts) if parts else None


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts) and p.is_file())


def resolve_files(source: str) -> list[Path]:
    """The sorted list of files ``data.source`` names; a UserError if none."""
    if source == "stdlib":
        files = stdlib_files()
    elif any(ch in source for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(Path(source).expanduser()), recursive=True)
                       if Path(p).is_file())
        if not files:
            raise UserError(f"data.source = {source!r}: the glob matches no files")
    else:
        path = Path(source).expanduser()
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not files:
                raise UserError(f"data.source = {source!r}: the directory holds no files")
        else:
            raise UserError(f"data.source = {source!r}: no such file or directory "
                            "(allowed: a file, a directory, a glob, or 'stdlib')")
    return files


def file_format(path: Path, fmt: str) -> str:
    return FORMAT_BY_SUFFIX.get(path.suffix.lower(), "text") if fmt == "auto" else fmt


def read_documents(path: Path, fmt: str, text_field: str, stats: ReadStats | None = None) -> Iterator[str]:
    """Yield the documents of one file: the whole file for text, one per JSONL
    line or Parquet row otherwise. Malformed input is a UserError naming the
    file; binary files and invalid UTF-8 are counted in ``stats``."""
    fmt = file_format(path, fmt)
    stats = stats if stats is not None else ReadStats()
    if fmt == "text":
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            stats.binary_files.append(path)
            return
        text = data.decode("utf-8", errors="replace")
        if replaced := text.count("\ufffd") - data.count("\ufffd".encode()):
            stats.replaced_chars += replaced
            stats.files_with_replacements += 1
        yield text
    elif fmt == "jsonl":
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise UserError(f"{path}:{lineno}: no '{text_field}' field "
                                    "(set data.text_field to the key holding the text)")
                if not isinstance(record[text_field], str):
                    raise UserError(f"{path}:{lineno}: field '{text_field}' is not a string")
                yield record[text_field]
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise UserError(f"{path}: not a readable Parquet file ({exc})") from None
        if text_field not in parquet.schema_arrow.names:
            raise UserError(f"{path}: no column '{text_field}'; columns: {', '.join(parquet.schema_arrow.names)}"
                            " (set data.text_field)")
        column_type = parquet.schema_arrow.field(text_field).type
        if str(column_type) not in ("string", "large_string", "string_view"):
            raise UserError(f"{path}: column '{text_field}' holds {column_type}, not text (set data.text_field "
                            "to a string column)")
        for batch in parquet.iter_batches(columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if text:
                    yield text
    else:
        raise UserError(f"data.format = {fmt!r}; allowed: auto, text, jsonl, parquet")
