"""The README's two commands are the ones CI and users run: keep them in sync with .ci/run."""

from conftest import REPO

TEST_CMD = "bash env_setup.sh && .venv/bin/python -m pytest"
DEMO_CMD = "bash env_setup.sh && .venv/bin/python scripts/demo.py"


def test_readme_commands_match_ci():
    readme = (REPO / "README.md").read_text()
    assert TEST_CMD in readme and DEMO_CMD in readme
    ci = (REPO / ".ci" / "run").read_text()
    assert TEST_CMD in ci.splitlines()
