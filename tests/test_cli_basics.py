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


def test_version_names_the_libraries_and_cuda():
    import platform
    from importlib import metadata

    import torch

    r = CliRunner().invoke(cli, ["--version"])
    lines = r.output.splitlines()
    assert lines[0] == f"loratool {__version__}"
    assert f"Python {platform.python_version()}" in lines
    cuda = "CUDA not available" if not torch.cuda.is_available() else "available"
    assert any(line.startswith(f"torch {torch.__version__} (") and cuda in line for line in lines), lines
    assert f"safetensors {metadata.version('safetensors')}" in lines
    assert f"huggingface_hub {metadata.version('huggingface_hub')}" in lines


def test_help_runs_without_importing_torch():
    code = ("import sys; from loratool.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "assert 'torch' not in sys.modules, 'torch imported by --help'\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip().endswith("ok"), out.stderr
