import subprocess
import sys

from click.testing import CliRunner

from loratool import __version__
from loratool.cli import cli


def test_version():
    r = CliRunner().invoke(cli, ["--version"])
    assert r.exit_code == 0
    assert __version__ in r.output


def test_help_does_not_import_torch():
    code = "import sys; from loratool.cli import cli; assert 'torch' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "loratool", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and __version__ in out.stdout
