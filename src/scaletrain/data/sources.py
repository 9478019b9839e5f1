"""Corpus sources: resolve ``data.source`` to files and read documents from them.

A source is a file, a directory (every file below it, recursively), a glob, or
``stdlib``: the .py files of the running interpreter's standard library, real
text every machine has. A directory written by HF ``datasets.save_to_disk``
(``state.json`` naming its Arrow files) reads as those Arrow files.

A document is a string, or for chat data (``data.format = chat``: JSONL lines
with ``messages``, a list of ``{"role", "content"}``) the list of messages.
"""

from __future__ import annotations

import codecs
import glob
import json
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from scaletrain.errors import UserError

FORMAT_BY_SUFFIX = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}
TEXT_BLOCK_BYTES = 64 << 20  # text files above this are streamed as blank-line-separated documents
FORMATS = ("auto", "text", "jsonl", "parquet", "arrow", "chat")
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class ReadStats:
    """What reading a corpus passed over: said in one warning, never silently."""

    binary_files: list[Path] = field(default_factory=list)  # skipped: a NUL byte in the first 8 KiB
    replaced_chars: int = 0  # bytes that are not valid UTF-8, read as U+FFFD
    files_with_replacements: int = 0
    empty_documents: int = 0  # an empty string or null row: nothing to train on

    def warning(self, n_files: int) -> str | None:
        parts = []
        if self.binary_files:
            parts.append(f"skipped {len(self.binary_files)} of {n_files} file(s) as binary "
                         f"(e.g. {self.binary_files[0]})")
        if self.replaced_chars:
            parts.append(f"replaced {self.replaced_chars} invalid UTF-8 byte sequence(s) in "
                         f"{self.files_with_replacements} file(s) with U+FFFD")
        if self.empty_documents:
            parts.append(f"skipped {self.empty_documents} empty document(s)")
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
        elif (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
            files = _saved_dataset_files(path)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not files:
                raise UserError(f"data.source = {source!r}: the directory holds no files")
        else:
            raise UserError(f"data.source = {source!r}: no such file or directory "
                            "(allowed: a file, a directory, a glob, or 'stdlib')")
    return files


def _saved_dataset_files(path: Path) -> list[Path]:
    """The Arrow files of a ``datasets.save_to_disk`` directory, in its order."""
    try:
        names = [entry["filename"] for entry in json.loads((path / "state.json").read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"data.source = {str(path)!r}: state.json does not list the dataset's Arrow files "
                        f"({exc})") from None
    files = [path / name for name in names]
    if missing := [f for f in files if not f.is_file()]:
        raise UserError(f"data.source = {str(path)!r}: {missing[0].name} listed in state.json is missing")
    return files


def file_format(path: Path, fmt: str) -> str:
    return FORMAT_BY_SUFFIX.get(path.suffix.lower(), "text") if fmt == "auto" else fmt


def read_documents(path: Path, fmt: str, text_field: str, stats: ReadStats | None = None) -> Iterator[str | list]:
    """Yield the documents of one file: the whole file for text, one per JSONL
    line or Parquet/Arrow row otherwise, a message list per chat line.
    Malformed input is a UserError naming the file (and line); binary files,
    invalid UTF-8 and empty documents are counted in ``stats``."""
    fmt = file_format(path, fmt)
    stats = stats if stats is not None else ReadStats()
    if fmt == "text":
        yield from _read_text(path, stats)
    elif fmt in ("jsonl", "chat"):
        for lineno, record in _json_lines(path):
            doc = _chat_messages(path, lineno, record) if fmt == "chat" else _text_field(path, lineno, record, text_field)
            if doc:
                yield doc
            else:
                stats.empty_documents += 1
    elif fmt in ("parquet", "arrow"):
        for text in _read_columnar(path, fmt, text_field):
            if text:
                yield text
            else:
                stats.empty_documents += 1
    else:
        raise UserError(f"data.format = {fmt!r}; allowed: {', '.join(FORMATS)}")


def _read_text(path: Path, stats: ReadStats) -> Iterator[str]:
    """The file as one document; a file larger than TEXT_BLOCK_BYTES is
    streamed instead, as documents cut at the last blank line of each block
    (a huge text file is a concatenation of documents, and never in memory)."""
    with path.open("rb") as fh:
        if b"\0" in fh.read(8192):
            stats.binary_files.append(path)
            return
        fh.seek(0)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        carry, replaced, yielded = "", 0, False
        while block := fh.read(TEXT_BLOCK_BYTES):
            decoded = decoder.decode(block, final=len(block) < TEXT_BLOCK_BYTES)
            replaced += decoded.count("\ufffd") - block.count("\ufffd".encode())
            text = carry + decoded
            cut = text.rfind("\n\n") + 2 if len(block) == TEXT_BLOCK_BYTES else len(text)
            if cut < 2 and len(text) < 4 * TEXT_BLOCK_BYTES:  # no blank line yet: read on (bounded)
                carry = text
                continue
            cut = cut if cut >= 2 else len(text)
            carry = text[cut:]
            if text[:cut]:
                yielded = True
                yield text[:cut]
        carry += decoder.decode(b"", final=True)
        if carry:
            yielded = True
            yield carry
    if replaced > 0:
        stats.replaced_chars += replaced
        stats.files_with_replacements += 1
    if not yielded:
        stats.empty_documents += 1


def _json_lines(path: Path) -> Iterator[tuple[int, object]]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None


def _text_field(path: Path, lineno: int, record, text_field: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        raise UserError(f"{path}:{lineno}: no '{text_field}' field "
                        "(set data.text_field to the key holding the text)")
    if not isinstance(record[text_field], str):
        raise UserError(f"{path}:{lineno}: field '{text_field}' is a {type(record[text_field]).__name__}, "
                        "not a string")
    return record[text_field]


def _chat_messages(path: Path, lineno: int, record) -> list[dict]:
    """A chat line: {"messages": [{"role": ..., "content": "..."}, ...]}."""
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list):
        raise UserError(f"{path}:{lineno}: no 'messages' list (data.format = chat needs "
                        '{"messages": [{"role": "user", "content": "..."}, ...]} per line)')
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in CHAT_ROLES and isinstance(m.get("content"), str)):
            raise UserError(f"{path}:{lineno}: messages[{i}] needs a 'role' ({', '.join(CHAT_ROLES)}) and a "
                            "string 'content'")
    return messages


def _read_columnar(path: Path, fmt: str, text_field: str) -> Iterator[str | None]:
    """The text column of a Parquet file or an Arrow IPC stream/file (as
    ``datasets`` writes them), one record batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if fmt == "parquet":
            reader = pq.ParquetFile(path)
            schema, batches = reader.schema_arrow, lambda: reader.iter_batches(columns=[text_field])
        else:
            reader = _open_arrow(path)
            schema, batches = reader.schema, lambda: iter(reader)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: not a readable {fmt.capitalize()} file ({exc})") from None
    if text_field not in schema.names:
        raise UserError(f"{path}: no column '{text_field}'; columns: {', '.join(schema.names)}"
                        " (set data.text_field)")
    column_type = schema.field(text_field).type
    if str(column_type) not in ("string", "large_string", "string_view"):
        raise UserError(f"{path}: column '{text_field}' holds {column_type}, not text (set data.text_field "
                        "to a string column)")
    for batch in batches():
        yield from batch.column(batch.schema.get_field_index(text_field)).to_pylist()


def _open_arrow(path: Path):
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(pa.memory_map(str(path)))  # what datasets writes
    except pa.ArrowInvalid:
        file = pa.ipc.open_file(pa.memory_map(str(path)))
        return _ArrowFileBatches(file)


class _ArrowFileBatches:
    def __init__(self, file):
        self.file, self.schema = file, file.schema

    def __iter__(self):
        return (self.file.get_batch(i) for i in range(self.file.num_record_batches))
