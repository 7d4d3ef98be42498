from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

from moe_models import make_adapter, make_base


@pytest.fixture(scope="session")
def moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Per model: `<name>/base` and `<name>/lora` (target_parameters on both expert parameters plus
    q_proj), made once per session."""
    root = tmp_path_factory.mktemp("moe")
    for name in ("qwen3_moe", "gpt_oss", "mixtral"):
        make_base(name, root / name / "base")
        make_adapter(root / name / "base", root / name / "lora")
    return root
