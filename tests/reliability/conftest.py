"""The hand-made COCO set of tests/data, for validation tests here."""

from tests.data.conftest import small_coco  # noqa: F401
