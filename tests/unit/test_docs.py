"""The manifests the docs show are the ones the tests apply, byte for byte."""

from __future__ import annotations

import re

import pytest

from tests.conftest import ROOT

# A doc names a file on the line before a fenced block: "`path`:" then ```yaml ... ```.
SHOWN = re.compile(r"^`([^`]+\.ya?ml)`:\n\n```yaml\n(.*?)```", re.M | re.S)


@pytest.mark.parametrize("doc", ["install.md", "cloning-cnpg.md"])
def test_manifests_in_the_docs_are_the_files_the_tests_apply(doc: str) -> None:
    text = (ROOT / "docs" / doc).read_text()
    shown = SHOWN.findall(text)
    assert shown, f"docs/{doc} shows no manifest file"
    for path, body in shown:
        assert (ROOT / path).read_text() == body, f"docs/{doc} shows an old copy of {path}"


def test_every_test_the_security_table_names_exists() -> None:
    """docs/security.md backs each claim with a test by name: the names must stay true."""
    text = (ROOT / "docs" / "security.md").read_text()
    named = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", text)
    assert len(named) >= 5
    for path, test in named:
        source = (ROOT / path).read_text()
        assert not test or f"def {test}(" in source, f"docs/security.md names {path}::{test}"
