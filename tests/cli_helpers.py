"""What the command-line tests share: running `cvae` in-process, and keeping the user's data
and cache out of it."""

import pytest

from cvae import cli


@pytest.fixture(autouse=True)
def no_real_data(monkeypatch, tmp_path):
    """Imported by a test module: none of its tests touches the user's cache or the real data
    unless it sets CVAE_DATA itself."""
    monkeypatch.delenv("CVAE_DATA", raising=False)
    monkeypatch.setenv("CVAE_CACHE", str(tmp_path / "cache"))


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of `cvae argv...` run in this process."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    """A usage or data error as the CLI must give it: exit 2, one `cvae: error:` line on
    stderr holding every fragment, no traceback."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cvae: error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
