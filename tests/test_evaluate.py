"""Metrics on hand-made predictions with known values."""

import pytest

from cgclora_lite.evaluate import (
    exact_match,
    first_word,
    label_scores,
    normalize_answer,
    parse_label,
    rouge_l,
    score_task,
    token_f1,
)
from cgclora_lite.tasks import Task

LABELS = ["negative", "neutral", "positive"]


def test_first_word_and_label_parsing():
    assert first_word("Positive. The tweet is happy") == "positive"
    assert first_word("  **Sport**") == "sport"
    assert first_word("...") == ""
    assert parse_label("Neutral!", LABELS) == "neutral"
    assert parse_label("The sentiment is positive", LABELS) is None  # first word rule


def test_label_scores_known_values():
    targets = ["positive", "negative", "neutral", "negative"]
    answers = ["positive", "Negative.", "I think neutral", "positive"]
    scores = label_scores(answers, targets, LABELS)
    assert scores["accuracy"] == 0.5
    assert scores["unparsed"] == 0.25
    # per class: negative P=1 R=1/2 F=2/3; neutral P=0 R=0 F=0 (the miss is unparsed);
    # positive P=1/2 R=1 F=2/3  ->  macro = (2/3 + 0 + 2/3) / 3 = 4/9
    assert scores["macro_f1"] == pytest.approx(4 / 9)


def test_squad_style_exact_match_and_token_f1():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert exact_match("the Eiffel tower.", "Eiffel Tower") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0
    assert token_f1("Paris, France", "Paris") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert token_f1("London", "Paris") == 0.0
    assert token_f1("", "") == 1.0


def test_rouge_l_known_values():
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    # LCS "the cat on the mat" = 5 of 6 tokens both ways
    assert rouge_l(["the cat was on the mat"], ["the cat sat on the mat"]) == pytest.approx(5 / 6)
    assert rouge_l(["a b", "x"], ["a b", "y"]) == pytest.approx(0.5)


def test_score_task_picks_the_headline_metric():
    qa = Task("trivia", "generate", "Q: {input}", "exact_match")
    scores = score_task(qa, ["Paris", "the moon"], ["paris", "Mars"])
    assert scores == {"score": 0.5, "exact_match": 0.5, "token_f1": 0.5, "per_example": [1.0, 0.0]}
    label = Task("sentiment", "classify", "{input}", "accuracy", labels=LABELS)
    labelled = score_task(label, ["positive", "Negative!", "maybe"], ["positive", "negative", "neutral"])
    assert labelled["per_example"] == [1.0, 1.0, 0.0] and labelled["score"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="as many answers as targets"):
        score_task(label, ["positive"], [])
