from pathlib import Path

import pytest

TOKENS = """
[[pass]]
name = "smarttrim.tokens"
target_ratio = 0.5
"""

INT8_ONLY = """
[[pass]]
name = "int8.dynamic"
"""


@pytest.fixture
def tokens_recipe(tmp_path: Path) -> str:
    path = tmp_path / "tokens.toml"
    path.write_text(TOKENS)
    return str(path)


@pytest.fixture
def int8_recipe(tmp_path: Path) -> str:
    path = tmp_path / "int8.toml"
    path.write_text(INT8_ONLY)
    return str(path)
