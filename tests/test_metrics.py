"""Metrics against values computed by hand."""

from __future__ import annotations

import pytest

from continual_transformer.evaluation import metrics as m

# R[t, k]: accuracy on experience k after training experiences 0..t
R = [
    [0.9, 0.1, 0.0],
    [0.6, 0.8, 0.2],
    [0.5, 0.7, 0.9],
]


def test_average_accuracy():
    assert m.average_accuracy(R) == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert m.average_accuracy(R[:2]) == pytest.approx((0.6 + 0.8) / 2)


def test_backward_transfer():
    assert m.backward_transfer(R) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert m.backward_transfer([[0.7, 0.0]]) == 0.0


def test_forward_transfer():
    assert m.forward_transfer(R, [0.0, 0.05, 0.1]) == pytest.approx(((0.1 - 0.05) + (0.2 - 0.1)) / 2)


def test_forgetting_uses_the_best_earlier_accuracy():
    R2 = [[0.5, 0.0], [0.9, 0.8], [0.6, 0.8]]  # T=3 rows, K=2 is not allowed (T > K)
    with pytest.raises(ValueError, match="T, K"):
        m.forgetting(R2)
    R3 = [[0.5, 0.0, 0.0], [0.9, 0.8, 0.0], [0.6, 0.4, 0.7]]
    assert m.forgetting(R3) == pytest.approx(((0.9 - 0.6) + (0.8 - 0.4)) / 2)


def test_forgetting_ratio():
    assert m.forgetting_ratio(0.8, 0.6) == pytest.approx(0.25)
    assert m.forgetting_ratio(0.0, 0.0) == 0.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [("The Answer!", "answer"), ("  an   apple, a pear ", "apple pear"), ("Tarnhelm.", "tarnhelm")],
)
def test_normalize_answer(text, expected):
    assert m.normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("prediction", "answer", "em", "has"),
    [
        ("Tarnhelm. It is a harbour city.", "Tarnhelm", 1.0, 1.0),
        ("The capital is Tarnhelm.", "Tarnhelm", 0.0, 1.0),
        ("Tarnhelmia", "Tarnhelm", 0.0, 0.0),
        ("It was founded in 1873.5 hm", "1873", 0.0, 0.0),
        ("1873\nMore text", "1873", 1.0, 1.0),
        ("the silver lynx", ["silver lynx", "lynx"], 1.0, 1.0),
    ],
)
def test_exact_match_and_contains(prediction, answer, em, has):
    assert m.exact_match(prediction, answer) == em
    assert m.contains(prediction, answer) == has


def test_token_f1_hand_computed():
    # prediction tokens: [silver, lynx, cat]; gold: [silver, lynx] -> P = 2/3, R = 1, F1 = 0.8
    assert m.token_f1("silver lynx cat", "the silver lynx") == pytest.approx(0.8)
    assert m.token_f1("nothing", "silver lynx") == 0.0
    assert m.token_f1("", "") == 1.0
