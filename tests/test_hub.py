"""fasttrunc.hub: where a model comes from (hub id or local directory, revisions) and its errors."""

from __future__ import annotations

import pytest

from fasttrunc.hub import REVISIONS_DIR, load_model, resolve_source


def test_local_directory_and_its_revisions(tmp_path):
    (tmp_path / REVISIONS_DIR / "step10").mkdir(parents=True)
    assert resolve_source(str(tmp_path), None) == (str(tmp_path), None, True)
    assert resolve_source(str(tmp_path), "main") == (str(tmp_path), None, True)
    assert resolve_source(str(tmp_path), "step10") == (str(tmp_path / REVISIONS_DIR / "step10"), None, True)
    with pytest.raises(ValueError, match=r"revision 'step5' is not in local model directory .*: step10$"):
        resolve_source(str(tmp_path), "step5")


def test_hub_ids_pass_through_and_paths_must_exist(tmp_path):
    assert resolve_source("EleutherAI/pythia-70m", "step1000") == ("EleutherAI/pythia-70m", "step1000", False)
    for missing in (str(tmp_path / "nope"), "./nope", "a/b/c"):
        with pytest.raises(ValueError, match="does not exist"):
            resolve_source(missing, None)
    for empty in ("", "  ", None):
        with pytest.raises(ValueError, match="is empty"):
            resolve_source(empty, None)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(dtype="float8"), "dtype 'float8'"),
        (dict(revision=""), "revision ''"),
    ],
)
def test_bad_arguments_fail_before_loading(tmp_path, kwargs, words):
    with pytest.raises(ValueError) as err:
        load_model(str(tmp_path), **kwargs)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_unloadable_local_directory_is_one_line(tmp_path):
    with pytest.raises(ValueError) as err:
        load_model(str(tmp_path))
    assert str(err.value).startswith(f"model directory {tmp_path} holds no model: it is empty")
    assert "\n" not in str(err.value)


def test_offline_hub_id_is_one_line_naming_it(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(ValueError) as err:
        load_model("EleutherAI/pythia-no-such-model", revision="step1")
    message = str(err.value)
    assert "\n" not in message
    assert "'EleutherAI/pythia-no-such-model' at revision step1" in message
    assert "--model /path/to/local/dir" in message
