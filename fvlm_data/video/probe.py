"""What is wrong with a video file, said in one line: the checks made before and while it is opened.

Every failure caused by the input file becomes an ``InputError`` with a short reason ("not a
video", "corrupt video", "truncated", "zero-length file", "unreadable"), so a precompute run can
record it and move on. `fvlm_data.video.decode` decodes; this module only tells files apart.
"""

from __future__ import annotations

import struct
from typing import Any, BinaryIO

import av

from fvlm_data.errors import InputError

# Magic bytes of containers we recognise, to tell "corrupt video" from "not a video".
VIDEO_MAGIC = (b"\x1a\x45\xdf\xa3", b"RIFF", b"OggS", b"FLV", b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3")
MP4_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid", b"styp", b"moof"}
FFMPEG_ERRORS = (av.FFmpegError, OSError, EOFError)


def error_line(e: BaseException) -> str:
    """One line from an FFmpeg/OS error, without the file name PyAV appends."""
    text = getattr(e, "strerror", None) or str(e)
    return " ".join(str(text).split())[:200]


def mp4_truncation(f: BinaryIO, size: int) -> str | None:
    """Walk the top-level ISO-BMFF boxes; return a reason if one runs past the end of the file so
    that nothing can be decoded.

    Cheap (a few header reads) and exact, where FFmpeg fails with a vague message (the index, 'moov',
    at the end: cut off with it). A cut-short 'mdat' after a complete 'moov' (index first, "faststart")
    is not refused: FFmpeg decodes the frames before the cut, and decoding says where the frames end
    (`VideoFile.frames_at`), so the segments before the cut are kept.
    """
    pos, indexed = 0, False
    while pos + 8 <= size:
        f.seek(pos)
        header = f.read(16)
        box_size, kind = struct.unpack(">I4s", header[:8])
        if pos == 0 and kind not in MP4_BOXES:
            return None  # not an mp4/mov file
        if box_size == 1 and len(header) == 16:
            box_size = struct.unpack(">Q", header[8:16])[0]
        elif box_size == 0:
            return None  # box extends to the end of the file by definition
        if box_size < 8:
            return None  # garbage; let FFmpeg judge
        if pos + box_size > size:
            if kind == b"mdat" and indexed:
                return None  # decodable up to the cut
            lost = ", and the index ('moov') is lost with the end of the file" if kind == b"mdat" else ""
            return f"truncated: '{kind.decode('latin-1')}' box ends at byte {pos + box_size} > file size {size}{lost}"
        indexed = indexed or kind == b"moov"
        pos += box_size
    return None


def open_container(f: BinaryIO, size: int) -> Any:
    """The PyAV container of an input file, or an InputError saying why it is not a readable video."""
    if size == 0:
        raise InputError("zero-length file")
    reason = mp4_truncation(f, size)
    if reason:
        raise InputError(reason)
    f.seek(0)
    head = f.read(12)
    f.seek(0)
    try:
        return av.open(f, mode="r")
    except FFMPEG_ERRORS as e:
        known = head[4:8] in MP4_BOXES or head.startswith(VIDEO_MAGIC)
        raise InputError(f"{'corrupt video' if known else 'not a video'}: {error_line(e)}") from None


def probe_duration(container: Any, stream: Any, start: float) -> float:
    """The stream's duration in seconds: from its metadata, else from the end of its last packet."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base - start
    if stream.frames and stream.average_rate:
        return stream.frames / float(stream.average_rate)
    # No metadata: demux (no decoding) to find the end of the last packet, then rewind.
    end = None
    try:
        for packet in container.demux(stream):
            if packet.pts is not None:
                stop = float((packet.pts + (packet.duration or 0)) * stream.time_base)
                end = stop if end is None else max(end, stop)
        container.seek(0)
    except FFMPEG_ERRORS as e:
        raise InputError(f"corrupt video: {error_line(e)}") from None
    if end is None:
        raise InputError("not a video: no video packets")
    return end - start
