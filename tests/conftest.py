"""Shared test fixtures: paths to the real data in ../shared/data and small model configs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ADAPTIVE_MAMBA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

# Keep JIT-built extensions (the C++ scan) in one cached place across test runs.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real data sets (books, wikitext-2, hotpotqa, cnn_dailymail, tokenizers)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def neox_tokenizer_dir(shared_data: Path) -> Path:
    return shared_data / "tokenizers" / "gpt-neox-20b"
