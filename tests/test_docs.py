"""The docs a newcomer reads stay true: the README fits on a few screens and its links resolve, the
configuration reference is what --help prints, and every source path a doc names exists."""
import os
import re
from pathlib import Path

from distgen.run import usage

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CONFIGURATION = REPO / "docs" / "configuration.md"


def configuration_reference() -> str:
    return ("# Configuration reference\n\nWhat `python -m distgen.run --help` prints (`DISTGEN_UPDATE_DOCS=1 "
            "bash scripts/test.sh tests/test_docs.py` rewrites this file).\n\n```text\n" + usage().strip() + "\n```\n")


def test_readme_fits_and_its_links_resolve():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        assert (REPO / target).exists(), target


def test_configuration_reference_is_the_help_text():
    if os.environ.get("DISTGEN_UPDATE_DOCS"):
        CONFIGURATION.write_text(configuration_reference())
    assert CONFIGURATION.read_text() == configuration_reference(), \
        "docs/configuration.md is stale: DISTGEN_UPDATE_DOCS=1 bash scripts/test.sh tests/test_docs.py"


def test_every_source_path_a_doc_names_exists():
    for doc in DOCS:
        for path in re.findall(r"`((?:distgen|tests|bench|scripts)/[\w/.-]+\.(?:py|sh|c|yaml|md|jsonl))`",
                               doc.read_text()):
            assert (REPO / path).exists(), f"{doc.name} names {path}, which does not exist"
