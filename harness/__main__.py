"""``python -m harness``: the same as the ``harness`` executable."""

from harness.cli import run

run()
