"""Client scripts the integration tests run in `.venv-clients` (LangChain, LiteLLM), and how.

The clients pin their own openai, pydantic and httpx, so they run as programs in their own
environment (`make clients-env`); `run` starts one and returns what it printed.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).parent
PYTHON = Path(os.environ.get("MOEGI_CLIENTS_PYTHON", REPO / ".venv-clients" / "bin" / "python"))


def run(args: list[str], cwd: Path = REPO, timeout: int = 600) -> str:
    if not PYTHON.exists():
        pytest.fail(f"{PYTHON} is missing: run `make clients-env` (make test does)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    done = subprocess.run([str(PYTHON), *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return done.stdout
