"""Reward functions on hand-computed values (gtpo_tracerl.md section 4.3), answer extraction, and scoring with a
fake verifier (no processes)."""

import doctest
import math

import pytest

from services.reward import rewards, scoring, verify
from services.reward.rewards import REWARDS, cosfn, extract_last_boxed
from services.reward.scoring import score_items
from services.reward.verify import Verdict
from shared.contracts.wire import ScoreItem


def item(response: str = "", **kw) -> ScoreItem:
    return ScoreItem(id="i", response=response, **kw)


# --------------------------------------------------------------------------- registry and doctests


def test_registry_names_and_doctests():
    assert set(REWARDS) == {
        "accuracy",
        "format",
        "boxed",
        "cosine",
        "soft_overlong",
        "repetition",
        "speed",
        "speed_penalty",
        "speed_gated",
        "code",
    }
    assert all(">>>" in (fn.__doc__ or "") for fn in REWARDS.values())
    assert rewards.NEEDS_VERDICT <= set(REWARDS)


@pytest.mark.parametrize("module", [rewards, scoring, verify])
def test_doctests_pass(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------- extract_last_boxed


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"first \boxed{1}, finally \boxed{2}.", "2"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces are not braces
        (r"\boxed{a \\ b}", r"a \\ b"),  # `\\` is one escape, not an escaped brace
        (r"$\boxed 5$", "5"),
        (r"\boxed   42 and more", "42"),
        (r"\boxed {7}", "7"),
        (r"\boxed{}", ""),
        (r"\boxed{1} then \boxedx{2}", "1"),  # `\boxedx` is another command
        (r"\boxed{1} then \boxed{\frac{1}{2}", None),  # the last box is truncated: no final answer
        (r"ends with \boxed", None),
        (r"\boxed $", None),
        ("no box at all", None),
        ("", None),
        ("}{}{" * 10, None),
    ],
)
def test_extract_last_boxed(text, expected):
    assert extract_last_boxed(text) == expected


def test_extract_last_boxed_survives_megabyte_inputs():
    # quadratic scanning would not finish these; the linear scan does them in well under a second
    assert extract_last_boxed("\\boxed{" * 200_000) is None
    assert extract_last_boxed("\\boxedx" * 150_000 + "\\boxed{1}") == "1"
    assert extract_last_boxed("\\boxed{1}" + "\\boxedx" * 150_000) == "1"
    assert extract_last_boxed("\\boxed{" + "{" * 1_000_000 + "}" * 1_000_000 + "}") == "{" * 1_000_000 + "}" * 1_000_000
    assert extract_last_boxed("\\" * 1_000_001) is None


# --------------------------------------------------------------------------- the rewards


def test_accuracy():
    assert REWARDS["accuracy"](item(), True) == 1.0
    assert REWARDS["accuracy"](item(), False) == 0.0
    assert REWARDS["accuracy"](item(finish_reason="length"), True) == 0.0
    # no finish reason: the reference's `len >= max_tokens` rule
    assert REWARDS["accuracy"](item(token_count=10, max_new_tokens=10), True) == 0.0
    assert REWARDS["accuracy"](item(token_count=10, max_new_tokens=10, finish_reason="stop"), True) == 1.0
    with pytest.raises(ValueError, match="accuracy needs the accuracy verdict"):
        REWARDS["accuracy"](item(), None)


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so x = \frac{1}{2} and \boxed{\frac{1}{2}}", 1.0),
        (r"\boxed{1} \boxed{2}", 0.0),  # two answers
        (r"\boxed{}", 0.0),  # empty answer
        (r"\boxed{  }", 0.0),
        (r"\boxed{1} and a stray {", 0.0),  # broken LaTeX elsewhere
        (r"\boxed{1} and a stray }", 0.0),
        (r"\boxed{\{1\}}", 1.0),
        (r"\boxed{\frac{1}{2}", 0.0),  # truncated
        ("no answer", 0.0),
    ],
)
def test_format(text, expected):
    assert REWARDS["format"](item(text), None) == expected


def test_boxed():
    assert REWARDS["boxed"](item(r"\boxed{x}"), None) == 0.1
    assert REWARDS["boxed"](item(r"\boxed{}"), None) == 0.0
    assert REWARDS["boxed"](item(r"\boxed{x"), None) == 0.0
    assert REWARDS["boxed"](item("x"), False) == 0.0


def test_cosine_endpoints_and_midpoint():
    # the schedule itself: b at t = 0, a at t = T
    assert cosfn(0, 100, 0.5, 1.0) == 1.0 and cosfn(100, 100, 0.5, 1.0) == pytest.approx(0.5)
    assert cosfn(0, 100, 0.0, -0.5) == -0.5 and cosfn(100, 100, 0.0, -0.5) == pytest.approx(0.0)
    cos = REWARDS["cosine"]
    at = lambda n: item(token_count=n, max_new_tokens=100, finish_reason="stop")  # noqa: E731
    assert cos(at(0), True) == 1.0 and cos(at(0), False) == -0.5
    assert cos(at(50), True) == pytest.approx(0.75) and cos(at(50), False) == pytest.approx(-0.25)
    assert cos(at(99), True) == pytest.approx(0.5, abs=1e-3) and cos(at(99), False) == pytest.approx(0.0, abs=1e-3)
    # length >= T or truncated: -0.5 whatever the verdict
    assert cos(at(100), True) == -0.5
    assert cos(item(token_count=10, max_new_tokens=100, finish_reason="length"), True) == -0.5
    with pytest.raises(ValueError, match="max_new_tokens"):
        cos(item(token_count=1), True)
    with pytest.raises(ValueError, match="verdict"):
        cos(at(1), None)


@pytest.mark.parametrize(
    "n, lmax, expected",
    [
        (0, 100, 0.0),
        (50, 100, 0.0),  # Lmax - Lcache = 50: the window starts here
        (75, 100, -0.5),
        (100, 100, -1.0),
        (150, 100, -1.0),  # clamped
        (60, 101, -0.18),  # Lcache = 50, window from 51: -(60 - 51) / 50
        (0, 1, 0.0),  # Lcache = max(1 // 2, 1) = 1
        (1, 1, -1.0),
    ],
)
def test_soft_overlong(n, lmax, expected):
    assert REWARDS["soft_overlong"](item(token_count=n, max_new_tokens=lmax), None) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", 0.0),
        ("a b", 0.0),  # no 3-gram
        ("a b c d", 0.0),  # 2 distinct trigrams
        ("a a a a a", -2 / 3),  # 3 trigrams, 1 distinct
        ("a b a b a b", -0.5),  # 4 trigrams, 2 distinct
        ("x  y\n\tz x y z", -0.25),  # any whitespace splits: 4 trigrams, 3 distinct
    ],
)
def test_repetition(text, expected):
    assert REWARDS["repetition"](item(text), None) == pytest.approx(expected)


def test_speed_endpoints():
    sp, pen = REWARDS["speed"], REWARDS["speed_penalty"]
    slow = item(token_count=8, steps=8, block_size=4)  # 1 token / step: u = 0
    fast = item(token_count=8, steps=2, block_size=4)  # 4 tokens / step = B: u = T = 3
    mid = item(token_count=5, steps=2, block_size=4)  # 2.5 tokens / step: u = 1.5 = T / 2
    assert (sp(slow, True), sp(fast, True)) == (0.5, 1.0)
    assert (sp(slow, False), sp(fast, False)) == (0.0, -0.5)
    assert sp(mid, True) == pytest.approx(0.75) and sp(mid, False) == pytest.approx(-0.25)
    assert {pen(slow, True), pen(mid, True), pen(fast, True)} == {0.5}
    assert (pen(slow, False), pen(fast, False)) == (0.0, -0.5)
    # faster than a block per step cannot happen, but is clipped; B = 1 has no speed range (T = 0)
    assert sp(item(token_count=10, steps=1, block_size=4), True) == 1.0
    assert sp(item(token_count=3, steps=3, block_size=1), True) == 0.5
    with pytest.raises(ValueError, match="steps >= 1"):
        sp(item(token_count=3, steps=0), True)
    with pytest.raises(ValueError, match="verdict"):
        pen(slow, None)


# --------------------------------------------------------------------------- scoring with a fake verifier


class FakeVerifier:
    """Answers from a table; records its calls."""

    def __init__(self, table: dict[tuple[str, str], Verdict]):
        self.table, self.calls = table, []

    def verify_many(self, pairs, deadline=None):
        self.calls.append(list(pairs))
        return [self.table[p] for p in pairs]


def test_score_items_statuses_and_totals():
    fake = FakeVerifier(
        {
            ("1/2", "0.5"): Verdict("ok", True),
            ("3", "2"): Verdict("ok", False),
            ("10^{10^{10}}", "2"): Verdict("timeout", None, "killed at the hard limit (5.00 s)"),
            ("x", "2"): Verdict("error", None, "ValueError: boom"),
        }
    )
    items = [
        ScoreItem(id="right", response=r"\boxed{1/2}", reference="0.5"),
        ScoreItem(id="wrong", response=r"\boxed{3}", reference="2"),
        ScoreItem(id="slow", response=r"\boxed{10^{10^{10}}}", reference="2"),
        ScoreItem(id="broken", response=r"\boxed{x}", reference="2"),
        ScoreItem(id="nobox", response="it is 2", reference="2"),
        ScoreItem(id="noref", response=r"\boxed{2}"),
    ]
    weights = {"accuracy": 1.0, "format": 0.5}
    out = {r.id: r for r in score_items(items, weights, fake)}
    assert len(fake.calls) == 1 and len(fake.calls[0]) == 4  # one batch, only items with a box and a reference
    assert (out["right"].status, out["right"].total) == ("ok", 1.5)
    assert out["right"].components == {"accuracy": 1.0, "format": 1.0}  # unweighted values
    assert (out["wrong"].status, out["wrong"].total) == ("ok", 0.5)
    assert (out["nobox"].status, out["nobox"].total) == ("ok", 0.0)
    # a timeout or an error is never a silent 0: status and detail say so, the total is 0
    assert (out["slow"].status, out["slow"].total) == ("timeout", 0.0)
    assert "killed at the hard limit" in out["slow"].detail
    assert out["slow"].components == {"format": 1.0}  # what could be computed is still reported
    assert (out["broken"].status, out["broken"].detail) == ("error", "accuracy check: ValueError: boom")
    assert (out["noref"].status, out["noref"].total) == ("error", 0.0)
    assert "accuracy needs the accuracy verdict" in out["noref"].detail


def test_score_items_skips_the_pool_when_no_reward_needs_a_verdict():
    fake = FakeVerifier({})
    items = [ScoreItem(id="a", response=r"\boxed{1}", reference="1", token_count=10, max_new_tokens=100)]
    [r] = score_items(items, {"boxed": 1.0, "soft_overlong": 2.0, "repetition": 1.0}, fake)
    assert fake.calls == [] and r.status == "ok" and r.total == pytest.approx(0.1)


def test_score_items_missing_inputs_are_errors():
    fake = FakeVerifier({("1", "1"): Verdict("ok", True)})
    [r] = score_items([ScoreItem(id="a", response=r"\boxed{1}", reference="1")], {"speed": 1.0, "cosine": 1.0}, fake)
    assert r.status == "error" and r.total == 0.0
    assert "speed:" in r.detail and "cosine:" in r.detail and "max_new_tokens" in r.detail


@pytest.mark.parametrize(
    "weights, message",
    [
        ({"accuracy": 1.0, "lenght": 1.0, "fmt": 2.0}, "unknown rewards 'fmt', 'lenght'"),
        ({}, "at least one reward"),
        ({"accuracy": math.inf}, "finite"),
        ({"accuracy": math.nan}, "finite"),
        ({"accuracy": 1e7}, "finite"),
    ],
)
def test_score_items_rejects_bad_weights(weights, message):
    with pytest.raises(ValueError, match=message):
        score_items([item("x")], weights, FakeVerifier({}))
