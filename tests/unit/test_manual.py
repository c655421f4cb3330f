"""cargohold(1), written from the parser: every command is in it, and groff reads it without a
warning."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from cargohold.cli.manual import commands, escape, render
from cargohold.cli.parser import build


def test_every_command_and_option_is_in_the_manual() -> None:
    page = render(build())
    paths = [path for path, _, _ in commands(build(), "cargohold", "")][1:]
    assert "cargohold volume create" in paths and "cargohold snapshot rm" in paths
    for path in paths:
        assert f".SS {escape(path)}\n" in page
    for option in ("\\-\\-replicas", "\\-\\-data\\-dir", "\\-\\-no\\-freeze", "\\-\\-keep"):
        assert f"\\fB{option}\\fR" in page
    assert ".SH EXIT STATUS" in page and "7 fenced" in page


def test_no_line_of_text_is_read_as_a_request() -> None:
    assert escape("a\n.b\n'c\\d-e") == "a\n\\&.b\n\\&'c\\ed\\-e"


@pytest.mark.skipif(shutil.which("groff") is None, reason="needs groff")
def test_groff_reads_it_without_a_warning() -> None:
    done = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z"], input=render(build()),
                          capture_output=True, text=True, env={**os.environ, "LANG": "C"})
    assert done.returncode == 0 and done.stderr == "", done.stderr
    shown = subprocess.run(["groff", "-man", "-Tutf8", "-rLL=80n", "-P-cbou"],
                           input=render(build()), capture_output=True, text=True,
                           check=True).stdout
    assert "cargohold volume create" in shown and "--tls-dir" in shown.replace("\u2010", "-")
