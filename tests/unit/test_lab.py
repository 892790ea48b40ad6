"""The lab's own hygiene: what its agents leave on the machine goes again."""

from __future__ import annotations

from pathlib import Path

from lab.agent import object_cache_kept_as_found


def test_the_object_cache_is_left_as_found(tmp_path: Path) -> None:
    """What lab agents keep in the node's object cache goes at the end; what
    was there stays, and a directory the block made goes too."""
    cache = tmp_path / "objects"
    with object_cache_kept_as_found(cache):
        cache.mkdir()
        (cache / "a.json").write_text("{}")
    assert not cache.exists()
    cache.mkdir()
    (cache / "old.json").write_text("{}")
    with object_cache_kept_as_found(cache):
        (cache / "new.json").write_text("{}")
    assert sorted(p.name for p in cache.iterdir()) == ["old.json"]
