"""A request's multipart form, read and parsed in memory, its size bounded while it streams in.

Starlette's own form parser spools every file part over 1 MB to a temporary file on disk; a photo a person
uploads must not touch the disk unless the server was told to keep it, so the body is read here into
memory (refused with 413 the moment it passes the limit, before it is all read) and parsed with
python-multipart's streaming parser into byte strings.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from python_multipart.multipart import MultipartParser, parse_options_header

MAX_FIELDS = 16  # text fields of a form (the page sends one: the name)
MAX_FIELD_BYTES = 64 << 10  # a text field (a name is at most 1 KiB of UTF-8)


class RequestError(Exception):
    """A bad request: its HTTP status and one line that says what was wrong and what would be valid."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class UploadedFile:
    filename: str  # as the browser sent it (display only: never used as a path)
    content_type: str
    data: bytes


@dataclass
class Form:
    fields: dict[str, str] = field(default_factory=dict)
    files: list[UploadedFile] = field(default_factory=list)  # every file part, in the order sent


async def read_body(chunks: AsyncIterator[bytes], declared_length: str | None, limit: int) -> bytes:
    """The whole body, or RequestError 413 as soon as it (or its declared Content-Length) passes `limit`."""
    too_big = RequestError(413, f"the upload is larger than this server's limit of {limit // (1024 * 1024)} MB "
                                "(--max-upload-mb); send fewer or smaller photos")
    if declared_length is not None:
        try:
            if int(declared_length) > limit:
                raise too_big
        except ValueError:
            raise RequestError(400, f"Content-Length {declared_length!r} is not a number of bytes") from None
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise too_big
        parts.append(chunk)
    return b"".join(parts)


def parse_form(body: bytes, content_type: str | None, max_files: int) -> Form:
    """The text fields and file parts of a multipart/form-data body; RequestError on anything else."""
    media, options = parse_options_header(content_type or "")
    if media == b"application/x-www-form-urlencoded":  # a form without files: its fields, then "no photo"
        return _urlencoded(body)
    if media != b"multipart/form-data":
        raise RequestError(415, f"the body must be multipart/form-data (photos and a name), got "
                                f"{(content_type or 'no Content-Type')!r}")
    boundary = options.get(b"boundary")
    if not boundary:
        raise RequestError(400, "the multipart body has no boundary in its Content-Type")
    form = Form()
    parser = _FormCollector(form, max_files)
    mp = MultipartParser(boundary, parser.callbacks())
    try:
        mp.write(body)
        mp.finalize()
    except RequestError:
        raise
    except Exception as e:  # python-multipart raises its own errors on malformed bodies
        raise RequestError(400, f"the multipart body cannot be parsed ({str(e).splitlines()[0] if str(e) else e!r})"
                           ) from None
    return form


def _urlencoded(body: bytes) -> Form:
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FIELDS)
    except (UnicodeDecodeError, ValueError) as e:
        raise RequestError(400, f"the form cannot be parsed ({e})") from None
    return Form(fields=dict(pairs))


class _FormCollector:
    """python-multipart's callbacks, collecting the parts into a Form in memory."""

    def __init__(self, form: Form, max_files: int):
        self.form, self.max_files = form, max_files
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._data: list[bytes] = []
        self._size = 0

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_part_data": self._part_data, "on_part_end": self._end,
                "on_header_field": self._field, "on_header_value": self._value, "on_header_end": self._header_end}

    def _begin(self) -> None:
        self._headers, self._data, self._size = {}, [], 0
        self._header_name = self._header_value = b""

    def _field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name = self._header_value = b""

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._size += end - start
        if b"filename" not in self._disposition()[1] and self._size > MAX_FIELD_BYTES:
            raise RequestError(413, f"a form field is over {MAX_FIELD_BYTES // 1024} KiB; the name is a short text")
        self._data.append(data[start:end])

    def _disposition(self) -> tuple[bytes, dict]:
        return parse_options_header(self._headers.get(b"content-disposition", b""))

    def _end(self) -> None:
        _, options = self._disposition()
        name = options.get(b"name", b"").decode("utf-8", "replace")
        data = b"".join(self._data)
        if b"filename" in options:
            if len(self.form.files) >= self.max_files:
                raise RequestError(413, f"more than {self.max_files} photos in one request; this server takes "
                                        f"1..{self.max_files} (--max-photos)")
            filename = options[b"filename"].decode("utf-8", "replace")
            content_type = self._headers.get(b"content-type", b"").decode("latin-1")
            self.form.files.append(UploadedFile(filename, content_type, data))
            return
        if len(self.form.fields) >= MAX_FIELDS:
            raise RequestError(400, f"more than {MAX_FIELDS} form fields; send `name` and the photos")
        try:
            self.form.fields[name] = data.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(400, f"form field {name!r} is not UTF-8 text") from None
