"""The public API is curated: this test pins it (as httpx does)."""

import subprocess
import sys

import milliwatt

EXPECTED = {
    "Milliwatt", "Step", "StepMeta", "StepResult", "StepRecord", "Attempt", "Energy", "TierResult",
    "Tier", "ModelBackend", "Completion", "register_tier",
    "MilliwattError", "InvalidRequestError", "ConfigError", "RuleFileError", "BackendError", "ModelLoadError",
    "RemoteError", "RemoteTimeout", "RemoteRateLimited", "RemoteUnavailable", "RemoteStreamError", "RemoteBadRequest",
    "RemoteAuthError", "NoTierAnswered", "__version__",
}


def test_public_exports_are_pinned():
    assert set(milliwatt.__all__) == EXPECTED
    for name in milliwatt.__all__:
        assert getattr(milliwatt, name) is not None


def test_import_is_light():
    probe = (
        "import sys, milliwatt, milliwatt.rules, milliwatt.cache, milliwatt.adapters;"
        "print(','.join(m for m in ('torch','litellm','llama_cpp','sentence_transformers','faiss') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
