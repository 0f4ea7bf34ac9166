"""The fault suite shares the trainer tests' tiny text-task config."""

from tests.train.conftest import tiny  # noqa: F401 - a fixture, used by name
