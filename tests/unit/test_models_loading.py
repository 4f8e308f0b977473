"""Model ids that cannot be loaded fail at once, in one line naming the model and what to do."""

from __future__ import annotations

import pytest

from stagewise.models.loading import ModelNotFoundError


def test_a_hub_model_that_is_not_cached_fails_at_once_offline_or_without_the_hub(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE, or a hub out of reach: one line naming the model and what to do, in well under a second (the
    hub client retried for about a minute, printing each retry twice)."""
    import socket
    import time

    from stagewise.models.loading import check_model_path

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match=r"'org/some-model' is not in the Hugging Face cache and "
                                                 r"HF_HUB_OFFLINE is set: .*model.name_or_path to a local copy"):
        check_model_path("org/some-model")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError, match=rf"the hub \(http://127.0.0.1:{port}\) cannot be reached"):
        check_model_path("org/some-model")
    assert time.monotonic() - start < 5
