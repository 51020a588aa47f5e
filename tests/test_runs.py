"""The run protocol's output helpers: directories checked before work, files written atomically."""

from pathlib import Path

import pytest

from fasttrunc import runs


def test_output_dir_is_created_and_checked(tmp_path):
    target = tmp_path / "a" / "b"
    assert runs.check_output_dir(target) == target and target.is_dir()
    assert list(target.iterdir()) == []  # the probe file is gone
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ValueError, match=f"--out {file} exists and is not a directory"):
        runs.check_output_dir(file)
    with pytest.raises(ValueError, match=f"is under {file}, which is a file"):
        runs.check_output_dir(file / "sub")
    with pytest.raises(ValueError, match="--out None is not a path"):
        runs.check_output_dir(None)


def test_read_only_output_dir(tmp_path, monkeypatch):
    """Root (CI) ignores permission bits, so a refusing mkdir stands in for a read-only place."""

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(ValueError, match="is not writable: Permission denied"):
        runs.check_output_dir(tmp_path / "new")


def test_atomic_write_replaces_whole_files_only(tmp_path):
    path = tmp_path / "results.json"
    runs.atomic_write_text(path, "old")
    with pytest.raises(RuntimeError), runs.atomic_output(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary left
    runs.atomic_write_text(path, "new")
    assert path.read_text() == "new"


def test_atomic_output_keeps_the_suffix(tmp_path):
    with runs.atomic_output(tmp_path / "plot.png") as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path
        tmp.write_bytes(b"png")
    assert (tmp_path / "plot.png").read_bytes() == b"png"
