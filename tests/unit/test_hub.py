"""A hub id on a machine that cannot reach the hub: one line in seconds, or the cached copy."""

import json
import subprocess
import sys
import time

from lfdist.model.tiny import tiny_config

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: refused at once


def _run(code: str, tmp_path, **env) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "HF_ENDPOINT": UNREACHABLE, "HF_HUB_CACHE": str(tmp_path), **env}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_unknown_hub_id_with_the_hub_unreachable_is_one_line_at_once(tmp_path):
    t0 = time.perf_counter()
    done = _run(
        "import sys\nfrom lfdist.cli import main\n"
        "sys.exit(main(['eval', '--model', 'someorg/some-model', '--data', 'synthetic:lm']))",
        tmp_path,
    )
    assert time.perf_counter() - t0 < 30  # was ~70 s of huggingface_hub retries
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"lfdist: error: model 'someorg/some-model' is not a local folder nor in the Hugging Face "
        f"cache ({tmp_path}), and the hub ({UNREACHABLE}) cannot be reached from this machine; "
        "give a local folder, or download the model once where the hub is reachable"
    ]


def test_cached_hub_id_is_read_from_the_cache_when_the_hub_is_unreachable(tmp_path):
    snapshot = tmp_path / "models--someorg--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "models--someorg--tiny" / "refs").mkdir()
    (tmp_path / "models--someorg--tiny" / "refs" / "main").write_text("0" * 40)
    (snapshot / "config.json").write_text(json.dumps(tiny_config("llama").to_dict()))
    t0 = time.perf_counter()
    done = _run(
        "import os\nfrom lfdist.model.positions import model_config\n"
        "from lfdist.model.specs import check_spec\n"
        "print(model_config('someorg/tiny')['model_type'], check_spec('someorg/tiny'),"
        " os.environ.get('HF_HUB_OFFLINE'))",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    # read from the cached snapshot folder, a plain local folder: nothing process-wide is set
    assert done.stdout.split() == ["llama", str(snapshot), "None"]
    assert time.perf_counter() - t0 < 30
