"""TensorBoard event files beside metrics.jsonl, read back here by a reader written in this test (TFRecord
framing with its CRC-32C, the protobuf wire format) and, where `tensorboard` is installed, by its own
EventAccumulator."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from bigbatch.train import TrainConfig, Trainer


def _crc32c_bitwise(data: bytes) -> int:
    """CRC-32C one bit at a time (the module under test uses a table)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _records(path: Path) -> list[bytes]:
    data, out, at = path.read_bytes(), [], 0
    while at < len(data):
        header = data[at : at + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[at + 8 : at + 12])[0] == _masked(_crc32c_bitwise(header))
        record = data[at + 12 : at + 12 + length]
        assert struct.unpack("<I", data[at + 12 + length : at + 16 + length])[0] == _masked(
            _crc32c_bitwise(record)
        )
        out.append(record)
        at += 16 + length
    return out


def _fields(message: bytes) -> list[tuple[int, object]]:
    """(field number, value) of a protobuf message: varints as ints, 64/32-bit as raw bytes, the rest as bytes."""
    out, at = [], 0

    def varint() -> int:
        nonlocal at
        shift = result = 0
        while True:
            byte = message[at]
            at += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result

    while at < len(message):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            out.append((number, varint()))
        elif wire == 1:
            out.append((number, message[at : at + 8]))
            at += 8
        elif wire == 5:
            out.append((number, message[at : at + 4]))
            at += 4
        else:
            length = varint()
            out.append((number, message[at : at + length]))
            at += length
    return out


def _events(folder: Path) -> list[dict]:
    """Each event as {"step", "scalars": {tag: value}, "text": {tag: str}, "version", "start"}."""
    events = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for record in _records(path):
            event = {"step": 0, "scalars": {}, "text": {}, "version": None, "start": False}
            for number, value in _fields(record):
                if number == 2:
                    event["step"] = value
                elif number == 3:
                    event["version"] = value
                elif number == 6:
                    event["start"] = dict(_fields(value)).get(1) == 1
                elif number == 5:
                    for _, item in _fields(value):
                        parts = dict(_fields(item))
                        tag = parts[1].decode()
                        if 2 in parts:
                            event["scalars"][tag] = struct.unpack("<f", parts[2])[0]
                        if 8 in parts:
                            event["text"][tag] = dict(_fields(parts[8]))[8].decode()
            events.append(event)
    return events


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def test_the_event_file_holds_every_steps_numbers_and_the_sample(tiny):
    assert _crc32c_bitwise(b"123456789") == 0xE3069283  # the reader's checksum is the standard one
    trainer = Trainer(
        TrainConfig.load(overrides=[*tiny, "run.name=tb", "train.steps=3", "train.eval_every=3"])
    )
    summary = trainer.fit()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    events = _events(trainer.run_dir / "tensorboard")
    assert events[0]["version"] == b"brain.Event:2"
    steps = {e["step"]: e["scalars"] for e in events if e["scalars"]}
    assert sorted(steps) == [1, 2, 3]
    for row in rows:
        scalars = steps[row["step"]]
        for key, tag in [
            ("loss", "train/loss"),
            ("lr", "train/lr"),
            ("grad_norm", "train/grad_norm"),
            ("batch_size", "batch/logical_batch_size"),
            ("items_per_s", "speed/tokens_per_s"),
            ("noise_scale", "batch/noise_scale"),
        ]:
            assert scalars[tag] == _f32(row[key]), (row["step"], tag)
    assert steps[3]["val/loss"] == _f32(rows[2]["val_loss"]) and "val/loss" not in steps[1]
    assert [e["text"]["sample"] for e in events if e["text"]] == [summary["sample"]]


def test_a_resume_marks_its_step_and_the_setting_turns_it_off(tiny):
    overrides = [*tiny, "train.steps=2", "checkpoint.every=1"]
    first = Trainer(TrainConfig.load(overrides=[*overrides, "run.name=r"]))
    first.fit()
    again = Trainer(TrainConfig.load(first.run_dir / "config.toml", ["train.steps=3"]), resume=first.run_dir)
    again.fit()
    starts = [e["step"] for e in _events(first.run_dir / "tensorboard") if e["start"]]
    assert starts == [3]  # TensorBoard drops the stopped run's events from step 3 on
    off = Trainer(TrainConfig.load(overrides=[*overrides, "run.name=off", "train.tensorboard=false"]))
    off.fit()
    assert not (off.run_dir / "tensorboard").exists()


def test_tensorboard_itself_reads_it(tiny):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    trainer = Trainer(
        TrainConfig.load(overrides=[*tiny, "run.name=tb", "train.steps=2", "train.eval_every=2"])
    )
    trainer.fit()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    acc = accumulator.EventAccumulator(str(trainer.run_dir / "tensorboard"))
    acc.Reload()
    assert [(s.step, s.value) for s in acc.Scalars("train/loss")] == [
        (r["step"], _f32(r["loss"])) for r in rows
    ]
