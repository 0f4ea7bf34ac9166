"""What the command line prints around the commands: third-party progress bars off a terminal."""

from __future__ import annotations

import io
import os

from bigbatch.cli import quiet_third_party_progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_hugging_face_progress_bars_are_off_in_a_log_and_left_alone_on_a_terminal(monkeypatch):
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    quiet_third_party_progress(_Terminal())
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
    quiet_third_party_progress(io.StringIO())  # a pipe or a file: "Loading weights" frames would fill it
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")  # the user's own choice is kept
    quiet_third_party_progress(io.StringIO())
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "0"
