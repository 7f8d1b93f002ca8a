"""The suite's own rules: a missing required dependency fails under CI, and unknown markers fail."""

import subprocess
import sys

import conftest
import pytest


def test_missing_dependency_skips_locally_and_fails_under_ci(monkeypatch):
    monkeypatch.setattr(conftest, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match="no_such_module_cgc is not installed: pip x"):
        conftest.require("no_such_module_cgc", "pip x")
    monkeypatch.setattr(conftest, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="CI is set, so this is a failure"):
        conftest.require("no_such_module_cgc", "pip x")
    assert conftest.require("json", "-").name == "json"


def test_an_unknown_marker_is_an_error(tmp_path):
    """``--strict-markers`` (pyproject.toml): a typo such as ``@pytest.mark.slwo`` must not
    silently put a slow test among the fast ones."""
    (tmp_path / "test_typo.py").write_text("import pytest\n\n@pytest.mark.slwo\ndef test_x():\n    pass\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--strict-markers", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode != 0 and "'slwo' not found in `markers`" in done.stdout + done.stderr
