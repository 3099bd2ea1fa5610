"""The data every method backs up: incompressible bytes plus many small text files.

The random part is what the tunnel has to carry (borg's default lz4 cannot shrink it); the
small files are what borg's per-file work costs (stat, files cache, metadata chunks). Text is
generated from a seeded PRNG so two runs of the bench back up the same kind of data.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

MB = 1000 * 1000
RANDOM_FILE_SIZE = 100 * MB  # several files, so borg's chunker sees more than one file
WORDS = [
    "backup",
    "server",
    "client",
    "repository",
    "archive",
    "chunk",
    "segment",
    "index",
    "tunnel",
    "socket",
    "pull",
    "serve",
    "append",
    "only",
    "restrict",
    "path",
    "window",
    "cipher",
    "latency",
    "throughput",
    "median",
    "ratio",
    "kernel",
    "process",
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "with",
    "was",
    "on",
    "be",
    "by",
    "this",
    "are",
    "from",
    "or",
    "have",
    "an",
    "not",
]


@dataclass(frozen=True)
class Dataset:
    path: Path
    random_bytes: int
    text_files: int
    text_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.random_bytes + self.text_bytes

    def describe(self) -> str:
        return (
            f"{self.random_bytes / MB:.0f} MB random in {_count_random(self.random_bytes)} "
            f"file(s) + {self.text_files} text files ({self.text_bytes / MB:.1f} MB), "
            f"{self.total_bytes / MB:.0f} MB total"
        )


def _count_random(size: int) -> int:
    return max(1, -(-size // RANDOM_FILE_SIZE))


def generate(path: Path, *, random_mb: float, text_files: int, seed: int = 5) -> Dataset:
    path.mkdir(parents=True)
    remaining = int(random_mb * MB)
    random_total = remaining
    index = 0
    while remaining > 0:
        size = min(RANDOM_FILE_SIZE, remaining)
        with (path / f"random-{index:02d}.bin").open("wb") as out:
            left = size
            while left:
                block = min(left, 4 * 1024 * 1024)
                out.write(os.urandom(block))
                left -= block
        remaining -= size
        index += 1
    rng = random.Random(seed)
    text_bytes = 0
    for number in range(text_files):
        directory = path / "text" / f"d{number % 40:02d}"
        directory.mkdir(parents=True, exist_ok=True)
        # 2-18 kB each (mean ~10 kB): typical config/source/log sizes.
        target = rng.randint(2000, 18000)
        words: list[str] = []
        length = 0
        while length < target:
            word = rng.choice(WORDS)
            words.append(word)
            length += len(word) + 1
        text = " ".join(words)
        lines = "\n".join(text[i : i + 72] for i in range(0, len(text), 72)) + "\n"
        data = lines.encode()
        (directory / f"f{number:05d}.txt").write_bytes(data)
        text_bytes += len(data)
    return Dataset(path, random_total, text_files, text_bytes)
