"""Evaluation: batched greedy generation per task, and the metrics of each kind of task.

Answers are generated greedily from the chat prompt (left padded, so every prompt ends at the
last position; task ids routed per sample, so one batch may mix tasks). Then, by task metric:

* ``accuracy`` (label tasks): the predicted label is the label the answer *begins with*
  (``parse_label``): compared without regard to case or Unicode form, after any opening quotes
  (straight or curly), brackets, asterisks or other punctuation, and only as a whole word, so
  zero-shot sentences parse ("Positive. The tweet..." -> "positive", "«Négatif»" ->
  "négatif", "Sci-fi!" -> "sci-fi") but "positively" is not the label "positive". **An answer
  that does not begin with one of the task's labels is unparseable: it counts as wrong**, for
  accuracy and for macro-F1 (scikit-learn's ``f1_score`` over the task's labels, where an
  unparseable answer is a miss for its true label and a hit for no label). The share of
  unparseable answers is reported as ``unparsed``. (``Task`` refuses labels that cannot be told
  apart this way: empty ones, or two that differ only in case or Unicode form.)
* ``rouge_l`` (generation): ROUGE-L F-measure from Google's ``rouge-score`` package, with its
  Porter stemmer, averaged over examples. Words are split by ``RougeTokenizer``: on ASCII text
  exactly rouge-score's default tokenizer (so English scores are rouge-score's), but a word may
  hold any letter, digit or mark (rouge-score's own drops every character outside
  ``[a-z0-9]``, so a perfect Greek or Chinese answer would score 0); Chinese and Japanese
  characters are one word each, and only ASCII words are stemmed. An empty answer to a target
  without words scores 1 (as in SQuAD's token F1), against any other target 0.
* ``exact_match`` (question answering): SQuAD's definitions: answers are lowercased, stripped of
  punctuation (ASCII's and Unicode's: curly quotes, guillemets, "。") and of the articles
  a/an/the, and whitespace-normalised; ``exact_match`` is 1 when the normalised strings are
  equal, ``token_f1`` the F1 of their bags of tokens.

Every task also gets ``score``, its headline metric (the one named by ``task.metric``).
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from typing import Sequence

import torch

from .adapters import attached_adapters
from .data import Collator, encode_prompt
from .models import autocast_dtype
from .tasks import Example, Task, fold_label

# Room for the answer, by metric: labels are a word or two; headlines and trivia answers short.
MAX_NEW_TOKENS = {"accuracy": 5, "rouge_l": 24, "exact_match": 16}


def _is_word_char(ch: str) -> bool:
    """A letter, digit or combining mark, in any script (``_`` and punctuation are not)."""
    return unicodedata.category(ch)[0] in "LNM"


def first_word(text: str) -> str:
    """The first word of ``text`` (a run of letters, digits and marks, in any script), lowercased,
    without punctuation ("" if there is none). For display; ``parse_label`` reads labels."""
    text = unicodedata.normalize("NFC", text).lower()
    start = next((i for i, ch in enumerate(text) if _is_word_char(ch)), len(text))
    end = next((i for i in range(start, len(text)) if not _is_word_char(text[i])), len(text))
    return text[start:end]


def parse_label(answer: str, labels: Sequence[str]) -> str | None:
    """The label ``answer`` begins with (as written in ``labels``), or None when it begins with
    none of them.

    Answer and labels are compared as ``tasks.fold_label`` writes them (Unicode NFC, case-folded,
    runs of spaces as one), so "POSITIVE", "Négatif" and "sci-fi" parse. The label may start
    after any characters that are not letters or digits (spaces, quotes straight or curly,
    brackets, ``**``...) and must end the answer or be followed by a character that is not a
    letter, digit or mark: "Positive." and "positive, because" give "positive", "positively"
    gives None. Labels are tried longest first ("sci-fi" before "sci"), at the earliest place.
    """
    text = fold_label(answer)
    start = next((i for i, ch in enumerate(text) if _is_word_char(ch)), len(text))
    folded = sorted(((fold_label(label), label) for label in labels), key=lambda p: -len(p[0]))
    for at in range(start + 1):  # inside the opening punctuation (a label may begin with some)
        for key, label in folded:
            end = at + len(key)
            if key and text.startswith(key, at) and (end == len(text) or not _is_word_char(text[end])):
                return label
    return None


def label_scores(answers: Sequence[str], targets: Sequence[str], labels: Sequence[str]) -> dict:
    """``accuracy``, ``macro_f1`` (over ``labels``) and the ``unparsed`` share of answers."""
    from sklearn.metrics import f1_score

    _check_lengths(answers, targets)
    predicted = [parse_label(a, labels) for a in answers]
    invalid = "<unparsed>"  # never a label, so it counts for no class
    as_labels = [p if p is not None else invalid for p in predicted]
    return {
        "accuracy": sum(p == t for p, t in zip(predicted, targets)) / len(targets),
        "macro_f1": float(f1_score(list(targets), as_labels, labels=list(labels), average="macro",
                                   zero_division=0)),
        "unparsed": predicted.count(None) / len(targets),
    }


_ASCII_PUNCTUATION = frozenset(string.punctuation)


def _is_punctuation(ch: str) -> bool:
    """SQuAD's ASCII punctuation (which includes symbols such as ``$``) or any Unicode
    punctuation (curly quotes, guillemets, dashes, "。", "、")."""
    return ch in _ASCII_PUNCTUATION or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, no punctuation (ASCII or Unicode), no articles, single
    spaces (after Unicode NFC, so composed and decomposed accents agree)."""
    text = "".join(ch for ch in unicodedata.normalize("NFC", text).lower() if not _is_punctuation(ch))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(answer: str, target: str) -> float:
    return float(normalize_answer(answer) == normalize_answer(target))


def token_f1(answer: str, target: str) -> float:
    """F1 of the normalised answer's and target's bags of tokens (SQuAD)."""
    pred, gold = normalize_answer(answer).split(), normalize_answer(target).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def _is_cjk(ch: str) -> bool:
    """A Chinese character or Japanese kana: scripts written without spaces, one word each."""
    code = ord(ch)
    return (0x3040 <= code <= 0x30FF or 0x3400 <= code <= 0x4DBF or 0x4E00 <= code <= 0x9FFF
            or 0xF900 <= code <= 0xFAFF or 0x20000 <= code <= 0x2FA1F)


class RougeTokenizer:
    """rouge-score's default tokenizer (lowercase, split on everything but letters and digits,
    Porter-stem the words of more than 3 characters) for every script.

    On ASCII text its tokens are exactly rouge-score's. Beyond ASCII a word is a run of letters,
    digits and combining marks of any script (after Unicode NFC), where rouge-score keeps only
    ``[a-z0-9]`` and so drops Greek, Cyrillic, Chinese... entirely; each Chinese character and
    Japanese kana is a word of its own (those scripts use no spaces); other scripts written
    without spaces (Thai, Khmer...) are not segmented: a run is one word. Only ASCII words are
    stemmed (the Porter stemmer is for English). Passed to ``rouge_scorer.RougeScorer`` as its
    ``tokenizer``.
    """

    def __init__(self, use_stemmer: bool = True):
        from nltk.stem import porter  # rouge-score's own dependency, and its stemmer

        self._stemmer = porter.PorterStemmer() if use_stemmer else None

    def tokenize(self, text: str) -> list[str]:
        words, word = [], []
        for ch in unicodedata.normalize("NFC", text).lower():
            if _is_word_char(ch) and not _is_cjk(ch):
                word.append(ch)
                continue
            if word:
                words.append("".join(word))
                word = []
            if _is_cjk(ch):
                words.append(ch)
        if word:
            words.append("".join(word))
        if self._stemmer is not None:
            words = [self._stemmer.stem(w) if len(w) > 3 and w.isascii() else w for w in words]
        return [w for w in words if w]


def rouge_l_each(answers: Sequence[str], targets: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure of every answer against its target (``rouge-score`` with its Porter
    stemmer and ``RougeTokenizer``); 1 for an answer without words to a target without words."""
    from rouge_score import rouge_scorer

    _check_lengths(answers, targets)
    tokenizer = RougeTokenizer()
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=tokenizer)
    return [1.0 if not tokenizer.tokenize(t) and not tokenizer.tokenize(a)
            else scorer.score(t, a)["rougeL"].fmeasure
            for a, t in zip(answers, targets)]


def rouge_l(answers: Sequence[str], targets: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (``rouge_l_each``)."""
    return sum(rouge_l_each(answers, targets)) / len(targets)


def score_task(task: Task, answers: Sequence[str], targets: Sequence[str]) -> dict:
    """The metrics of ``task``'s kind for these answers, plus ``score`` (the headline metric) and
    ``per_example``: the headline metric of every answer, whose mean is ``score`` (what the
    bootstrap intervals of ``stats`` resample)."""
    _check_lengths(answers, targets)
    if task.metric == "accuracy":
        scores = label_scores(answers, targets, task.labels)
        each = [float(parse_label(a, task.labels) == t) for a, t in zip(answers, targets)]
    elif task.metric == "rouge_l":
        each = rouge_l_each(answers, targets)
        scores = {"rouge_l": sum(each) / len(each)}
    else:
        each = list(map(exact_match, answers, targets))
        scores = {"exact_match": sum(each) / len(each),
                  "token_f1": sum(map(token_f1, answers, targets)) / len(targets)}
    return {"score": scores[task.metric], **scores, "per_example": each}


def _check_lengths(answers, targets) -> None:
    if len(answers) != len(targets) or not targets:
        raise ValueError(f"need as many answers as targets (and at least one): got "
                         f"{len(answers)} answers for {len(targets)} targets")


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    tasks: Sequence[Task],
    requests: Sequence[tuple[int, Example]],
    batch_size: int = 16,
    max_new_tokens: int = 8,
    max_prompt_length: int | None = None,
    amp: bool | str = "auto",
) -> list[str]:
    """Greedy answers for ``requests`` = (task id, example) pairs, in order.

    ``tasks[task_id]`` gives each request's task; the task ids are routed to the attached adapters
    (if any), so one batch may mix tasks. ``amp``: bf16 autocast (``models.autocast_dtype``).
    """
    collate = Collator(tokenizer.pad_token_id, padding_side="left")
    device = next(model.parameters()).device
    dtype = autocast_dtype(device, amp)
    routed = attached_adapters(model) is not None
    answers = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        items = [{**encode_prompt(tokenizer, tasks[t], ex, max_prompt_length), "task_id": t}
                 for t, ex in chunk]
        batch = collate(items)
        extra = {"task_ids": batch["task_ids"]} if routed else {}
        with torch.autocast(device.type, dtype or torch.bfloat16, enabled=dtype is not None):
            out = model.generate(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                **extra,
            )  # (B, prompt + new)
        new = out[:, batch["input_ids"].shape[1]:]  # (B, new)
        answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    return [a.strip() for a in answers]


def evaluate_tasks(
    model,
    tokenizer,
    tasks: Sequence[Task],
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 16,
    max_prompt_length: int | None = None,
    only: Sequence[str] | None = None,
    amp: bool | str = "auto",
) -> dict[str, dict]:
    """Generate and score the tasks of ``tasks`` (routed with task id = position in ``tasks``).

    Returns ``{task name: {"score": ..., <metrics>..., "per_example": [...], "n": examples,
    "answers": [...]}}``.
    Tasks are generated one at a time (each with its own answer length); ``limit`` caps the
    examples per task; ``only`` names the tasks to evaluate (default: all).
    """
    results = {}
    for task_id, task in enumerate(tasks):
        if only is not None and task.name not in only:
            continue
        examples = task.split(split)[:limit]
        if not examples:
            raise ValueError(f"task {task.name!r} has no {split} examples to evaluate")
        answers = generate_answers(model, tokenizer, tasks, [(task_id, ex) for ex in examples],
                                   batch_size, MAX_NEW_TOKENS[task.metric], max_prompt_length, amp)
        results[task.name] = {**score_task(task, answers, [ex.target for ex in examples]),
                              "n": len(examples), "answers": answers}
    return results
