import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Every test (and every notebook a test starts: kernels inherit the environment) reads the committed fixture data
# (tests/fixtures/data, see its PROVENANCE.md), so the suite needs nothing beside the checkout. Set here, before
# any test module is imported, so import-time defaults see it too.
REPO = Path(__file__).resolve().parents[1]
FIXTURES_DATA = REPO / "tests" / "fixtures" / "data"
_USER_DATA_DIR = os.environ.get("PMET_DATA_DIR")
os.environ["PMET_DATA_DIR"] = str(FIXTURES_DATA)


def _full_data_dir():
    """The complete shared data folder, for the few tests that need it (record counts, checksums):
    ``$PMET_FULL_DATA_DIR``, else the ``PMET_DATA_DIR`` the session was started with, else ``<repo>/../shared/data``
    (or ``../shared/data`` from the working directory); None when none holds the full files."""
    for cand in (
        os.environ.get("PMET_FULL_DATA_DIR"),
        _USER_DATA_DIR,
        REPO.parent / "shared" / "data",
        Path.cwd().parent / "shared" / "data",
    ):
        if not cand:
            continue
        d = Path(cand).expanduser()
        if (d / "counterfact" / "counterfact_subset_merged.json").is_file() and not (d / "FIXTURES").exists():
            return d
    return None


FULL_DATA = _full_data_dir()


@pytest.fixture
def full_data(monkeypatch):
    """The complete shared data as PMET_DATA_DIR for this test; skips (saying where it looked) when absent."""
    if FULL_DATA is None:
        pytest.skip(
            "needs the complete shared data (e.g. 1,653 CounterFact records, 21,919 case ids), not found at "
            "$PMET_FULL_DATA_DIR, $PMET_DATA_DIR or <repo>/../shared/data; the suite otherwise runs on "
            "tests/fixtures/data"
        )
    monkeypatch.setenv("PMET_DATA_DIR", str(FULL_DATA))
    return FULL_DATA


torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

TINY = ["tiny-gptj", "tiny-neox", "tiny-llama", "tiny-gpt2", "tiny-gemma3"]


@pytest.fixture(scope="session")
def tiny_models():
    from pmet import load_model

    return {name: load_model(name) for name in TINY}


@pytest.fixture(params=TINY)
def tiny(request, tiny_models):
    return tiny_models[request.param]


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PMET_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run far faster on one thread (and the machine is shared): ``pytestmark =
    pytest.mark.usefixtures("one_thread")`` in a test module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
