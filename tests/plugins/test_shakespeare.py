"""The shakespeare dataset: the complete plays offline, Tiny Shakespeare's download."""

from __future__ import annotations

import io
import re

import pytest

from nanogpt_core.errors import DataError
from nanogpt_plugins.datasets import shakespeare
from nanogpt_plugins.datasets.shakespeare import (
    ShakespeareOptions,
    ShakespeareSource,
    complete_plays,
    convert_play,
)


def test_convert_play_gives_tiny_shakespeare_form():
    markdown = (
        "# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_FRANCISCO at his post. Enter to him\nBERNARDO_\n\n"
        "**BERNARDO**  \nWho's there?\n\n**FRANCISCO**  \n_\\[Aside]_  \nNay, answer me: stand,  \nand unfold yourself.\n\n"
        "_Exit_\n\n**HAMLET**  \nWords, words, \\--words.\n"
    )
    assert convert_play(markdown) == (
        "BERNARDO:\nWho's there?\n\nFRANCISCO:\nNay, answer me: stand,\nand unfold yourself.\n\n"
        "HAMLET:\nWords, words, --words."
    )


def test_complete_plays_are_offline_and_clean():
    text = complete_plays()
    assert len(text) > 4_000_000
    assert text.startswith("THESEUS:\nNow, fair Hippolyta")  # A Midsummer Night's Dream comes first
    assert not re.search(r"[#_\\\\\[\]]|\*\*", text)
    speeches = text.split("\n\n")
    assert all(re.match(r"^[^\n]+:\n", s) for s in speeches[:1000])
    assert "HAMLET:\nTo be, or not to be" in text


def test_complete_source_splits_90_10(tmp_path):
    source = ShakespeareSource(ShakespeareOptions(source="complete"))
    assert source.variant == "complete-char"
    train = "".join(source.documents("train", tmp_path))
    val = "".join(source.documents("val", tmp_path))
    assert len(train) == int(len(train + val) * 0.9)
    assert train + val == complete_plays()


def test_tiny_download_is_checksum_verified_and_cached(tmp_path, shared_data, monkeypatch):
    body = (shared_data / "tinyshakespeare" / "input.txt").read_bytes()
    calls = []

    def fake_urlopen(url, timeout):
        calls.append(url)
        return io.BytesIO(body)

    monkeypatch.setattr(shakespeare.urllib.request, "urlopen", fake_urlopen)
    assert shakespeare.download_tiny(tmp_path) == tmp_path / "input.txt"
    assert shakespeare.download_tiny(tmp_path).read_bytes() == body
    assert calls == [shakespeare.TINY_URL]  # the second call used the verified copy

    monkeypatch.setattr(
        shakespeare.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"tampered")
    )
    with pytest.raises(DataError, match="failed its sha256 check"):
        shakespeare.download_tiny(tmp_path / "other")


def test_tiny_download_failure_points_at_the_offline_options(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise OSError("Name or service not known")

    monkeypatch.setattr(shakespeare.urllib.request, "urlopen", offline)
    with pytest.raises(
        DataError,
        match=re.escape('set dataset.path to a local input.txt, or use source = "complete"'),
    ):
        list(ShakespeareSource(ShakespeareOptions()).documents("train", tmp_path))
