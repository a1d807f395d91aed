import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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
