"""TensorBoard event files beside metrics.jsonl, written without TensorBoard installed.

A run writes `runs/NAME/tensorboard/events.out.tfevents.TIME.HOST`: the
TFRecord framing (length, masked CRC-32C, record, masked CRC-32C) around
`tensorflow.Event` protocol buffers, encoded here field by field (the few
fields a scalar and a text summary use), so that watching a run needs
`tensorboard` only where it is viewed: `tensorboard --logdir runs`. One event
per step holds the loss, the validation loss, lr, gradient norm, throughput,
logical batch and noise scale; the end of the run adds the text sample. A
resumed run starts a new file with a `SessionLog.START` at the resumed step,
which tells TensorBoard to drop the steps after it that the stopped run wrote.
`train.tensorboard = false` writes none.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time
from pathlib import Path
from typing import IO, Any

FILE_VERSION = b"brain.Event:2"

SCALARS: dict[str, str] = {
    "loss": "train/loss",
    "val_loss": "val/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "batch_size": "batch/logical_batch_size",
    "noise_scale": "batch/noise_scale",
}
"""metrics.jsonl's field -> the TensorBoard tag it is written under (throughput: `speed/<unit>_per_s`)."""


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord framing.

    Example:
        >>> hex(crc32c(b"123456789"))
        '0xe3069283'
    """
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC-32C of `data`."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # negative int64 as protobuf writes it
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _bytes_field(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _varint_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _event(
    step: int, *, summary: bytes = b"", file_version: bytes = b"", session_start: bool = False
) -> bytes:
    """An Event: wall_time (1, double), step (2), file_version (3), summary (5), session_log (6)."""
    out = _varint(1 << 3 | 1) + struct.pack("<d", time.time()) + _varint_field(2, step)
    if file_version:
        out += _bytes_field(3, file_version)
    if summary:
        out += _bytes_field(5, summary)
    if session_start:
        out += _bytes_field(6, _varint_field(1, 1))  # SessionLog{status: START}
    return out


def scalar_value(tag: str, value: float) -> bytes:
    """A Summary.Value{tag, simple_value} (a Summary's field 1)."""
    inner = _bytes_field(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value)
    return _bytes_field(1, inner)


def text_value(tag: str, text: str) -> bytes:
    """A Summary.Value holding a string tensor (DT_STRING, scalar) for the text plugin."""
    plugin = _bytes_field(1, _bytes_field(1, b"text"))  # SummaryMetadata{plugin_data{plugin_name: "text"}}
    tensor = (
        _varint_field(1, 7) + _bytes_field(2, b"") + _bytes_field(8, text.encode())
    )  # dtype, shape, string_val
    return _bytes_field(1, _bytes_field(1, tag.encode()) + _bytes_field(8, tensor) + _bytes_field(9, plugin))


class TensorBoardLog:
    """One event file in `folder`; `write(row)` per step (rank 0).

    Args:
        folder: runs/NAME/tensorboard (created).
        unit: what the task's loss counts ("tokens", "samples"), for the throughput tag.
        resume_step: a resumed run's step: TensorBoard drops later steps of the stopped run.
    """

    def __init__(self, folder: Path, unit: str = "samples", resume_step: int | None = None) -> None:
        """Open a new event file and write its version record (and the resume marker)."""
        folder.mkdir(parents=True, exist_ok=True)
        self.unit = unit
        self.path = folder / f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
        self._file: IO[bytes] | None = open(self.path, "ab")
        self._record(_event(0, file_version=FILE_VERSION))
        if resume_step is not None:
            self._record(_event(resume_step + 1, session_start=True))
        self.flush()

    def write(self, row: dict[str, Any]) -> None:
        """One metrics row's numbers as scalars at its step (non-finite and missing ones left out)."""
        values = [(tag, row.get(key)) for key, tag in SCALARS.items()]
        values.append((f"speed/{self.unit}_per_s", row.get("items_per_s")))
        summary = b"".join(
            scalar_value(tag, float(v))
            for tag, v in values
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        )
        if summary:
            self._record(_event(int(row["step"]), summary=summary))
            self.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        """A text summary (the trained model's sample) at `step`."""
        self._record(_event(step, summary=text_value(tag, text)))
        self.flush()

    def _record(self, data: bytes) -> None:
        if self._file is None:
            return
        length = struct.pack("<Q", len(data))
        self._file.write(
            length + struct.pack("<I", masked_crc(length)) + data + struct.pack("<I", masked_crc(data))
        )

    def flush(self) -> None:
        """Hand what was written to the OS (TensorBoard reads the file as it grows)."""
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Close the file (safe to call twice)."""
        if self._file is not None:
            self._file.close()
            self._file = None
