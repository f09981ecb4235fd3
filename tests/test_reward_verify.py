"""The math-verify process pool: easy verdicts, 200+ hostile inputs answered within the limit, hung and crashed
workers killed and replaced, request deadlines, thread safety, shutdown. Hangs and crashes come from the test's own
check (`reward_checks.with_faults`), run by real worker processes."""

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from reward_checks import CRASH, HANG, with_faults

from services.reward.scoring import score_items
from services.reward.verify import (
    MAX_CHARS,
    VerifierPool,
    check_size,
    nesting_depth,
    verify_inline,
)
from shared.contracts.wire import ScoreItem

TIMEOUT_S = 0.75
# a result may arrive one pool-loop turn and one process kill after the limit; 2 busy CPU cores add jitter
SLACK_S = 1.0

EASY = [
    (r"\frac{1}{2}", "0.5", True),
    ("0.5", r"\frac{1}{2}", True),
    ("2", "3", False),
    (r"\sqrt{2}/2", r"\frac{\sqrt{2}}{2}", True),
    ("x^2+2x+1", "(x+1)^2", True),
    ("[1,2)", "(1,2]", False),
    (r"\pi", "3.14159265358979", True),
    ("-3", r"\boxed{-3}", True),  # a reference that is already boxed
]


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(workers=2, timeout_s=TIMEOUT_S, check=with_faults) as p:
        assert p.wait_ready(60)
        yield p


def assert_serves_easy_case(pool: VerifierPool) -> None:
    assert pool.healthy()
    [v] = pool.verify_many([(r"\frac{1}{2}", "0.5")])
    assert (v.status, v.correct) == ("ok", True)


# --------------------------------------------------------------------------- easy cases


def test_easy_cases_through_the_pool(pool):
    verdicts = pool.verify_many([(a, r) for a, r, _ in EASY])
    assert [(v.status, v.correct) for v in verdicts] == [("ok", want) for *_, want in EASY]


def test_easy_cases_inline():
    for answer, reference, want in EASY:
        v = verify_inline(answer, reference)
        assert (v.status, v.correct) == ("ok", want), (answer, reference, v)


def test_unparseable_answer_is_wrong_not_error(pool):
    [v] = pool.verify_many([("}{", "3")])
    assert (v.status, v.correct) == ("ok", False) and "could not be parsed" in v.detail


def test_identical_pairs_are_checked_once_and_answered_each(pool):
    verdicts = pool.verify_many([("2", "2")] * 8 + [("3", "2")])
    assert [v.correct for v in verdicts] == [True] * 8 + [False]


# --------------------------------------------------------------------------- caps


def test_size_caps():
    assert check_size("1" * MAX_CHARS, "1") is None
    assert check_size("1" * (MAX_CHARS + 1), "1").detail.startswith("too large: the answer has")
    assert check_size("1", "1" * (MAX_CHARS + 1)).detail.startswith("too large: the reference has")
    assert check_size("{" * 50 + "}" * 50, "1") is None
    assert check_size("{" * 51 + "}" * 51, "1").detail == "too large: the answer nests 51 deep (cap 50)"
    assert nesting_depth("[1, 2)") == 1 and nesting_depth("))))((") == 2


# --------------------------------------------------------------------------- hostile inputs


def hostile_strings() -> list[str]:
    """Inputs that crash, hang or blow up naive graders. Deterministic."""
    rng = random.Random(0)
    megabyte = 1 << 20
    raw = bytes(range(256)) * 4
    towers = [
        "10^{10^{10^{10}}}",
        "9**9**9**9",
        "9^{9^{9^{9}}}",
        "2^{2^{2^{2^{2^{2}}}}}",
        "10^{10^{10}} + 1",
        "(10^{8})!",
        "(10^{10})!",
        "10!!!!!!!!",
        "99999^{99999999}",
        "x^{x^{x^{x^{x}}}}",
        "e^{e^{e^{e^{e}}}}",
        r"\Gamma(10^{10})",
        r"\binom{10^{10}}{10^{5}}",
        r"\sin(10^{100})",
        r"\prod_{k=1}^{10^{9}} k",
        r"\sum_{k=1}^{10^{12}} k^{k}",
        "1e999999",
        "1e-999999",
        r"10^{-10^{10}}",
        r"\sqrt[10^{10}]{2}",
    ]
    big = [
        "1" * megabyte,
        "a" * megabyte,
        "(" * megabyte,
        "\\frac{" * 200_000,
        "\\left(" * 200_000,
        "\\boxed{" * 150_000,
        " " * megabyte + "1",
        "$" * megabyte,
        "\\" * megabyte,
        "}" * megabyte,
    ]
    nested = [
        "\\frac{" * 5000,
        "\\frac{1}{" * 5000 + "2" + "}" * 5000,
        "\\frac{1}{" * 40 + "2" + "}" * 40,  # under the nesting cap: math-verify must cope
        "\\sqrt{" * 45 + "2" + "}" * 45,
        "{" * 51 + "1" + "}" * 51,
        "(" * 49 + "1" + ")" * 49,
        "[" * 300,
        "\\left(" * 40 + "x" + "\\right)" * 40,
        "\\left(" * 150,
        "\\right)" * 150,
        "\\begin{pmatrix}" * 60,
        "\\begin{pmatrix}1 & 2 \\\\ 3 & 4\\end{pmatrix}" * 20,
        "x_{" * 45 + "1" + "}" * 45,
        "\\text{" * 45 + "a" + "}" * 45,
    ]
    unbalanced = [
        "\\boxed{",
        "\\boxed{\\frac{1}{2}",
        "}{",
        "{{{{",
        "}}}}",
        "\\frac{1}{",
        "\\frac}{",
        "\\left(1",
        "1\\right)",
        "\\begin{pmatrix}1",
        "\\end{pmatrix}",
        "\\sqrt{",
        "^{",
        "_",
        "\\",
        "\\\\",
        "$",
        "$$",
        "\\[",
        "\\]",
    ]
    weird = [
        "",
        " ",
        "\x00",
        "\x00" * 500,
        "1\x002",
        "\\boxed{\x00}",
        raw[:300].decode("utf-8", errors="surrogateescape"),
        raw[:300].decode("utf-8", errors="replace"),
        raw[128:400].decode("latin-1"),
        "\udcff\udcfe1",
        "\ufffd" * 300,
        "１２３",  # full-width digits
        "½",
        "∞",
        "e\u0301" * 300,  # combining accents
        "\u200b\u200d\u2060" * 100,  # zero-width characters
        "\u202e1+1",  # right-to-left override
        "😀" * 200,
        "\\" + "x" * 900,
        "\\undefinedcommand{1}",
        "\\def\\x{\\x}\\x",
        "\\newcommand{\\a}{\\a}\\a",
        "%" * 500,
        "&" * 500,
        "#1#2#3",
        "1/0",
        "0/0",
        "\\frac{1}{0}",
        "\\infty - \\infty",
        "\\log(0)",
        "\\sqrt{-1}",
        "1" * 999,  # a 999-digit integer: under the cap
        "0." + "3" * 900,
        "-" * 500 + "1",
        "1," * 400,
        "1=" * 400,
        "\\le" * 300,
        "x=y=z=" * 100,
        "\\{" * 40 + "\\}" * 40,
        "\\int\\int\\int" * 50,
        "\\lim_{x\\to\\infty}" * 30,
        "\\mathbb{R}^{\\aleph_0}",
        "\\emptyset \\cup \\emptyset",
        "(-\\infty, \\infty) \\cap [1, 2)",
        "\\text{A} \\text{B} \\text{(C)}",
        "' OR 1=1; --",
        "__import__('os').system('true')",
        "lambda: 0",
        "${jndi:ldap://x}",
        "\r\n" * 300,
    ]
    noise = [
        "".join(rng.choice("{}()[]^_\\$0123456789+-*/=!,.xyz frac sqrt left right") for _ in range(200))
        for _ in range(30)
    ]
    noise += [
        bytes(rng.randrange(256) for _ in range(300)).decode("utf-8", errors="surrogateescape") for _ in range(10)
    ]
    return towers + big + nested + unbalanced + weird + noise


def hostile_pairs() -> list[tuple[str, str]]:
    """Each hostile string as the answer, as the reference, and as both."""
    strings = hostile_strings()
    return [(s, "5") for s in strings] + [("5", s) for s in strings] + [(s, s) for s in strings[::3]]


def test_at_least_200_hostile_inputs():
    assert len(hostile_pairs()) >= 200


def test_hostile_inputs_answered_within_the_limit(pool):
    pairs = hostile_pairs()
    verdicts = pool.verify_many(pairs)
    assert len(verdicts) == len(pairs)
    for (answer, reference), v in zip(pairs, verdicts, strict=True):
        assert v.status in ("ok", "timeout", "error"), (answer[:80], reference[:80], v)
        assert v.elapsed_s <= TIMEOUT_S + SLACK_S, (answer[:80], reference[:80], v)
        assert (v.correct is None) == (v.status != "ok")
        if v.status != "ok":
            assert v.detail  # never a bare failure
    statuses = {v.status for v in verdicts}
    assert statuses == {"ok", "timeout", "error"}  # the corpus exercises every path
    assert_serves_easy_case(pool)


def test_hostile_towers_one_by_one_from_outside(pool):
    """Wall time measured by the caller (not the pool's own clock), each worker warm before the call."""
    for answer in ["10^{10^{10^{10}}}", "(10^{10})!", "9^{9^{9^{9}}}"]:
        assert pool.wait_ready(60)
        t0 = time.perf_counter()
        [v] = pool.verify_many([(answer, "5")])
        assert time.perf_counter() - t0 <= TIMEOUT_S + SLACK_S
        assert v.status in ("timeout", "ok", "error")
    assert_serves_easy_case(pool)


def test_hostile_responses_through_scoring(pool):
    responses = [
        "\\boxed{" * 200_000,
        "\\boxed{" + "{" * 60 + "}" * 60 + "}",
        "\\boxed{10^{10^{10^{10}}}}",
        "\x00" * 1000,
    ]
    items = [ScoreItem(id=str(i), response=r, reference="5") for i, r in enumerate(responses)]
    results = score_items(items, {"accuracy": 1.0, "format": 1.0, "repetition": 1.0}, pool)
    assert [r.status for r in results] == ["ok", "error", "timeout", "ok"]
    assert results[1].detail == "accuracy check: too large: the answer nests 60 deep (cap 50)"
    assert all(r.total == 0.0 for r in results)


# --------------------------------------------------------------------------- killed, crashed, replaced


def test_hung_worker_is_killed_and_replaced(pool):
    before = pool.stats()
    t0 = time.perf_counter()
    [v] = pool.verify_many([(HANG, "1")])  # blocks SIGALRM, like a C call: only SIGKILL stops it
    assert time.perf_counter() - t0 <= TIMEOUT_S + SLACK_S
    assert v.status == "timeout" and v.detail.startswith("killed at the hard limit")
    assert pool.wait_ready(60)
    after = pool.stats()
    assert after["kills"] == before["kills"] + 1 and after["restarts"] == before["restarts"] + 1
    assert_serves_easy_case(pool)


def test_soft_deadline_keeps_the_worker(pool):
    before = pool.stats()
    [v] = pool.verify_many([("10^{10^{10^{10}}}", "5")])
    assert v.status == "timeout" and "soft deadline" in v.detail
    assert pool.stats()["kills"] == before["kills"]


def test_crashed_worker_is_an_error_and_replaced(pool):
    before = pool.stats()
    verdicts = pool.verify_many([(CRASH, "1"), ("2", "2")])
    assert verdicts[0].status == "error" and "died (exit code 3)" in verdicts[0].detail
    assert (verdicts[1].status, verdicts[1].correct) == ("ok", True)
    assert pool.stats()["deaths"] == before["deaths"] + 1
    assert pool.wait_ready(60)
    assert_serves_easy_case(pool)


def test_fault_answers_are_plain_strings_to_the_default_check():
    with VerifierPool(workers=1, timeout_s=TIMEOUT_S) as p:
        [v] = p.verify_many([(HANG, "1")])
        assert v.status == "ok" and v.correct is False and p.stats()["kills"] == 0


# --------------------------------------------------------------------------- request deadline


def test_request_deadline_times_out_queued_pairs_and_they_never_run():
    """One worker, held by a hang until its 3 s hard limit: pairs queued behind it with a 0.5 s deadline come back as
    `timeout` at the deadline, and are skipped afterwards (the queued hang is never started, so one kill in all)."""
    with VerifierPool(workers=1, timeout_s=3.0, check=with_faults) as p:
        assert p.wait_ready(60)
        held: list = []
        holder = threading.Thread(target=lambda: held.extend(p.verify_many([(HANG, "1")])))
        holder.start()
        deadline = time.monotonic() + 30
        while p.stats()["busy_workers"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        verdicts = p.verify_many([(HANG + "-queued", "1"), ("2", "2")], deadline=time.monotonic() + 0.5)
        assert [(v.status, v.correct) for v in verdicts] == [("timeout", None)] * 2
        assert all(
            v.detail == "the request deadline passed while the check was queued (never started)" for v in verdicts
        )
        holder.join(30)
        assert held[0].status == "timeout" and held[0].detail.startswith("killed at the hard limit")
        assert p.wait_ready(60)
        assert_serves_easy_case(p)  # answered after the skipped pairs left the queue
        assert p.stats()["kills"] == 1


# --------------------------------------------------------------------------- threads and shutdown


def test_concurrent_callers_from_threads(pool):
    """FastAPI calls verify_many from its threadpool: math-verify's signal timeouts would fail there."""
    batches = [[(str(i), str(i)), (str(i), str(i + 1))] for i in range(12)]
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(pool.verify_many, batches))
    assert [[v.correct for v in r] for r in results] == [[True, False]] * 12


def test_inline_timeout_needs_the_main_thread():
    errors = []

    def run():
        try:
            verify_inline("1", "1", timeout_s=1.0)
        except ValueError as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert errors and "main thread" in str(errors[0])
    assert verify_inline("2^{2^{40}}", "1", timeout_s=0.3).status == "timeout"  # here, in the main thread


def test_close_settles_in_flight_jobs_and_refuses_new_ones():
    p = VerifierPool(workers=1, timeout_s=30.0, check=with_faults)
    assert p.wait_ready(60)
    out = []
    caller = threading.Thread(target=lambda: out.extend(p.verify_many([(HANG, "1"), ("1", "1")])))
    caller.start()
    deadline = time.monotonic() + 30
    while p.stats()["busy_workers"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    p.close()
    caller.join(10)
    assert [v.status for v in out] == ["error", "error"] and out[0].detail == "the verifier pool closed"
    assert not p.healthy()
    with pytest.raises(RuntimeError, match="closed"):
        p.verify_many([("1", "1")])
    p.close()  # idempotent


def test_bad_arguments():
    with pytest.raises(ValueError, match="workers"):
        VerifierPool(workers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        VerifierPool(timeout_s=0)
    with pytest.raises(ValueError, match="check: must be a module-level function"):
        VerifierPool(check=lambda answer, reference: None)
