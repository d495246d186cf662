"""Human units and glob rules."""

from __future__ import annotations

import pytest

from replicator.globs import PathFilter, compile_glob
from replicator.units import format_duration, format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4MiB", 4 << 20),
        ("4 mib", 4 << 20),
        ("1.5GB", 1_500_000_000),
        ("512KiB", 512 << 10),
        ("4096", 4096),
        (4096, 4096),
        ("1TiB", 1 << 40),
        ("10kb", 10_000),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["4XB", "MiB", "-1", "", "1.2.3MiB", True])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("15m", 900), ("30s", 30), ("1h30m", 5400), ("500ms", 0.5), ("2d", 172800), ("10", 10), (2.5, 2.5)],
)
def test_parse_duration(text: str | float, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("bad", ["15x", "m", "1h 30", "", "-5s", "s30"])
def test_parse_duration_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_formatting() -> None:
    assert format_size(0) == "0 B"
    assert format_size(4 << 20) == "4.00 MiB"
    assert format_duration(0.5) == "0.50s"
    assert format_duration(185) == "3m05s"
    assert format_duration(7800) == "2h10m"


@pytest.mark.parametrize(
    ("pattern", "path", "hit"),
    [
        ("*.tmp", "a/b/c.tmp", True),  # no slash: matches a name at any depth
        ("*.tmp", "a/b/c.tmpx", False),
        ("step-*/model.safetensors", "step-1/model.safetensors", True),
        ("step-*/model.safetensors", "x/step-1/model.safetensors", False),  # anchored
        ("**/*.json", "a/b/c.json", True),
        ("**/*.json", "c.json", True),  # ** matches zero directories
        ("a/**", "a/b/c", True),
        ("step-000200", "step-000200/shard.bin", True),  # a directory selects its contents
        ("*", "a/b", True),
        ("a/*", "a/b/c", True),  # a/b is selected, and everything below it
        ("a/?", "a/bc", False),
        ("[ab].txt", "x/a.txt", True),
        ("[!ab].txt", "x/a.txt", False),
    ],
)
def test_glob_rules(pattern: str, path: str, hit: bool) -> None:
    assert bool(compile_glob(pattern).match(path)) is hit


def test_path_filter() -> None:
    f = PathFilter(include=["**"], exclude=["*.tmp", "cache/"])
    assert f("a/model.bin")
    assert not f("a/model.bin.tmp")
    assert not f("cache/x/y")
    assert PathFilter([], [])("anything")
