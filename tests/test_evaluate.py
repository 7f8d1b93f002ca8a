"""Metrics on hand-made predictions with known values."""

import re

import pytest

from cgclora_lite.evaluate import (
    RougeTokenizer,
    exact_match,
    first_word,
    label_scores,
    normalize_answer,
    parse_label,
    rouge_l,
    rouge_l_each,
    score_task,
    token_f1,
)
from cgclora_lite.tasks import Example, Task

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
    assert token_f1("x y z", "x y w") == pytest.approx(2 / 3)  # precision = recall = 2/3
    assert token_f1("x", "x y z w") == pytest.approx(2 * 1 * 0.25 / 1.25)  # precision 1, recall 1/4


def test_rouge_l_known_values():
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    # LCS "the cat on the mat" = 5 of 6 tokens both ways
    assert rouge_l(["the cat was on the mat"], ["the cat sat on the mat"]) == pytest.approx(5 / 6)
    assert rouge_l(["a b", "x"], ["a b", "y"]) == pytest.approx(0.5)


def test_score_task_averages_rouge_over_answers():
    headline = Task("headline", "generate", "Headline: {input}", "rouge_l")
    result = score_task(headline, ["a b", "x"], ["a b", "y"])
    assert result["per_example"] == pytest.approx([1.0, 0.0]) and result["score"] == pytest.approx(0.5)


def test_score_task_picks_the_headline_metric():
    qa = Task("trivia", "generate", "Q: {input}", "exact_match")
    scores = score_task(qa, ["Paris", "the moon"], ["paris", "Mars"])
    assert scores == {"score": 0.5, "exact_match": 0.5, "token_f1": 0.5, "per_example": [1.0, 0.0]}
    label = Task("sentiment", "classify", "{input}", "accuracy", labels=LABELS)
    labelled = score_task(label, ["positive", "Negative!", "maybe"], ["positive", "negative", "neutral"])
    assert labelled["per_example"] == [1.0, 1.0, 0.0] and labelled["score"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="as many answers as targets"):
        score_task(label, ["positive"], [])


# --- edge cases: labels beyond [a-z0-9], quotes, empty answers, other scripts -------------------


@pytest.mark.parametrize("answer, labels, expected", [
    ("Sci-fi, mostly.", ["sci-fi", "drama"], "sci-fi"),  # hyphenated label (was "sci": unparsed)
    ("sci-fi", ["sci", "sci-fi"], "sci-fi"),  # longest label first
    ("sci", ["sci", "sci-fi"], "sci"),
    ("Négatif.", ["négatif", "positif"], "négatif"),  # accented label (was "n": unparsed)
    ("NÉGATIF", ["négatif", "positif"], "négatif"),  # uppercase accented answer
    ("ne\u0301gatif", ["négatif", "positif"], "négatif"),  # decomposed é (NFD) in the answer
    ("POSITIVE!", ["negative", "positive"], "positive"),  # uppercase answer
    ("positive", ["Negative", "Positive"], "Positive"),  # capitalised labels, returned as written
    ("“Positive” — the tweet is upbeat", ["negative", "positive"], "positive"),  # curly quotes
    ("«négatif»", ["négatif", "positif"], "négatif"),  # guillemets
    ("‘Sci-fi’", ["sci-fi", "drama"], "sci-fi"),
    ("**Very good**", ["very good", "good", "bad"], "very good"),  # two-word label, longest first
    ("good", ["very good", "good", "bad"], "good"),
    ("-1", ["1", "-1"], "-1"),  # a label that starts with punctuation
    ("Позитивный", ["позитивный", "негативный"], "позитивный"),  # Cyrillic
    ("正面。", ["正面", "负面"], "正面"),  # Chinese: the label is followed by "。", not a letter
])
def test_parse_label_reads_the_label_the_answer_begins_with(answer, labels, expected):
    assert parse_label(answer, labels) == expected


@pytest.mark.parametrize("answer, labels", [
    ("positive", ["pos", "neg"]),  # a label that is only the start of a longer word
    ("positively so", ["positive", "negative"]),
    ("négatifs", ["négatif", "positif"]),  # the accented letter continues the word
    ("", ["negative", "positive"]),  # empty answer
    ("“”", ["negative", "positive"]),  # quotes only
    ("I'd say positive", ["negative", "positive"]),  # the label must begin the answer
])
def test_parse_label_refuses_what_is_not_a_whole_label(answer, labels):
    assert parse_label(answer, labels) is None


def test_score_task_with_labels_beyond_lowercase_ascii():
    genre = Task("genre", "classify", "{input}", "accuracy", labels=["Sci-fi", "Drame", "Comédie"],
                 test=[])
    answers = ["sci-fi.", "“Comédie”", "", "drame romantique", "Comédies"]
    targets = ["Sci-fi", "Comédie", "Drame", "Drame", "Comédie"]
    scores = score_task(genre, answers, targets)
    assert scores["per_example"] == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert scores["accuracy"] == pytest.approx(3 / 5) and scores["unparsed"] == pytest.approx(2 / 5)
    # per class: Sci-fi P=1 R=1 F=1; Drame P=1 R=1/2 F=2/3; Comédie P=1 R=1/2 F=2/3
    assert scores["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


@pytest.mark.parametrize("labels, words", [
    (["positive", "Positive"], "differ only in case"),
    (["négatif", "ne\u0301gatif"], "Unicode form"),
    (["very good", "very  good"], "spacing"),
    (["positive", ""], "empty"),
    (["positive", "   "], "empty"),
    (["bad", "bad"], "repeat ['bad']"),
    ([], "non-empty list"),
    ("positive", "non-empty list of strings"),
])
def test_task_refuses_labels_accuracy_cannot_tell_apart(labels, words):
    with pytest.raises(ValueError, match=r"task 'x': .*" + re.escape(words)):
        Task("x", "c", "{input}", "accuracy", labels=labels)


def test_task_accepts_labels_of_any_script_and_case():
    task = Task("x", "c", "{input}", "accuracy", labels=["Sci-fi", "négatif", "very good", "正面"],
                test=[Example("i", "négatif", "x")])
    assert task.labels == ["Sci-fi", "négatif", "very good", "正面"]


def test_rouge_tokenizer_equals_rouge_scores_default_on_ascii_text():
    """English scores must not move: on ASCII text the tokens (Porter stems included) and the
    scores are rouge-score's own."""
    import random
    import string

    from nltk.stem import porter
    from rouge_score import rouge_scorer, tokenize

    words = ["running", "runs", "ran", "Generously", "generalization", "The", "cats", "cat's",
             "isn't", "U.S.", "e-mail", "x_y", "2004", "3rd", "£5m", "50%", "re-elected", "a",
             "hopeful", "hoping", "Studies", "studying", "BBC", "flying", "agreed", "caresses"]
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) + rng.choice(["", "", ",", ".", "!", "'", "\"", ")", "--"])
                      for _ in range(rng.randint(0, 9)))
             for _ in range(200)]
    texts += ["".join(rng.choice(string.printable) for _ in range(30)) for _ in range(100)]
    stemmer = porter.PorterStemmer()
    ours = RougeTokenizer()
    for text in texts:
        assert ours.tokenize(text) == tokenize.tokenize(text, stemmer), text
    default = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    answers, targets = texts[:150], texts[150:]
    pairs = [(a, t) for a, t in zip(answers, targets) if default._tokenizer.tokenize(t)]
    expected = [default.score(t, a)["rougeL"].fmeasure for a, t in pairs]
    assert rouge_l_each(*zip(*pairs)) == expected
    assert rouge_l(["Studies were running"], ["study was run"]) == pytest.approx(2 / 3)  # stemmed


def test_rouge_l_scores_other_scripts():
    assert rouge_l(["Кошка сидит на ковре"], ["Кошка сидит на ковре"]) == pytest.approx(1.0)
    assert rouge_l(["Кошка сидит на полу"], ["кошка сидит на ковре"]) == pytest.approx(3 / 4)
    assert rouge_l(["Ο γάτος κάθεται"], ["ο γάτος κάθεται"]) == pytest.approx(1.0)
    assert rouge_l(["Café Müller öffnet"], ["cafe Muller offnet"]) == pytest.approx(0.0)  # no accent folding
    # Chinese: one word per character; LCS 3 of answer 3 and target 5: F = 2 * 1 * 0.6 / 1.6
    assert rouge_l(["东京塔很高"], ["东京塔很高"]) == pytest.approx(1.0)
    assert rouge_l(["东京塔"], ["东京塔很高"]) == pytest.approx(0.75)
    assert rouge_l(["東京タワー"], ["東京タワーです"]) == pytest.approx(2 * 5 / 7 / (1 + 5 / 7))


def test_empty_answers_and_empty_targets():
    assert rouge_l([""], ["the cat sat"]) == 0.0
    assert rouge_l(["the cat sat"], [""]) == 0.0
    assert rouge_l([""], [""]) == 1.0 and rouge_l(["..."], ["—"]) == 1.0  # nothing to say, said
    assert exact_match("", "Paris") == 0.0 and exact_match("", "") == 1.0
    assert token_f1("", "Paris") == 0.0 and token_f1("Paris", "") == 0.0
    label = Task("sentiment", "classify", "{input}", "accuracy", labels=LABELS)
    scores = score_task(label, ["", "positive"], ["negative", "positive"])
    assert scores["per_example"] == [0.0, 1.0] and scores["unparsed"] == 0.5
    free = Task("headline", "generate", "{input}", "rouge_l")
    assert score_task(free, ["", "A cat"], ["", "a cat"])["per_example"] == [1.0, 1.0]


def test_exact_match_on_curly_quotes_and_other_scripts():
    assert exact_match("Reese's Pieces", "Reese’s Pieces") == 1.0  # a real trivia target
    assert exact_match("“Paris”", "Paris") == 1.0
    assert exact_match("«Москва»", "москва") == 1.0
    assert exact_match("東京。", "東京") == 1.0
    assert exact_match("東京", "京都") == 0.0
    assert exact_match("Zu\u0308rich", "Zürich") == 1.0  # decomposed and composed ü
    assert normalize_answer("The  “Eiffel” Tower!") == "eiffel tower"
    assert token_f1("Москва, Россия", "москва") == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_the_scripts_without_spaces_are_exactly_their_unicode_blocks():
    from cgclora_lite.evaluate import _is_cjk

    blocks = {"kana": (0x3040, 0x30FF), "CJK extension A": (0x3400, 0x4DBF), "CJK": (0x4E00, 0x9FFF),
              "compatibility": (0xF900, 0xFAFF), "extensions B-F and supplement": (0x20000, 0x2FA1F)}
    for name, (low, high) in blocks.items():
        assert all(_is_cjk(chr(c)) for c in (low, (low + high) // 2, high)), name
        assert not _is_cjk(chr(low - 1)) and not _is_cjk(chr(high + 1)), name  # the neighbours are not
    assert not any(map(_is_cjk, "aé1 ñ"))


def test_a_label_inside_a_word_is_not_read():
    # the label may start inside the opening punctuation, never after the first letter of a word
    assert parse_label("xpositive", ["positive"]) is None and parse_label("'positive", ["positive"]) == "positive"
    assert parse_label("a positive", ["positive"]) is None  # a later word is not the answer's start


@pytest.mark.filterwarnings("error")  # sklearn warns where a class's F1 is 0/0; it is defined here
def test_a_class_never_predicted_nor_true_scores_zero_f1():
    scores = label_scores(["a", "a"], ["a", "a"], ["a", "b", "c"])
    assert scores["accuracy"] == 1.0 and scores["macro_f1"] == pytest.approx(1 / 3)


def test_the_rouge_tokenizer_stems_only_when_asked():
    from cgclora_lite.evaluate import RougeTokenizer

    assert RougeTokenizer().tokenize("Running dogs") == ["run", "dog"]
    assert RougeTokenizer(use_stemmer=False).tokenize("Running dogs") == ["running", "dogs"]


def test_answers_and_targets_must_pair_up():
    for answers, targets in ((["a"], ["a", "b"]), (["a", "b"], ["a"]), ([], [])):
        with pytest.raises(ValueError, match="need as many answers as targets"):
            label_scores(answers, targets, ["a", "b"])
