"""Evaluation protocols against their sources, and the bootstrap intervals and AUP on hand-derived cases."""

import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.eval.metrics import aup, aup_weight, bootstrap_ci, paired_bootstrap_ci, percentile
from services.eval.protocols import PROTOCOLS, apply_overrides, get_protocol, protocol_table

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- protocols


def settings(name: str, decoding: str | None = None) -> dict:
    p = PROTOCOLS[name]
    d = p.decodings[0] if decoding is None else next(d for d in p.decodings if d.name == decoding)
    return {"k": p.k, **d.params.model_dump(exclude={"stop_token_ids", "n", "seed", "logprobs"})}


def test_dirl_is_avg_at_16_at_t1_with_8192_tokens_and_top_k_50():
    # DiRL README: 16 samples at T=1.0, 8,192 tokens; GTPO-Trainer configs/rl.yaml `evaluation`: top_k 50, top_p 1,
    # block 4, 4 denoising steps, low_confidence_dynamic at 0.9 (reference/gtpo_tracerl.md 9.1 and 10.1)
    assert settings("dirl") == {"k": 16, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "max_new_tokens": 8192,
                                "block_size": 4, "denoising_steps": 4, "strategy": "low_confidence_dynamic",
                                "confidence_threshold": 0.9}  # fmt: skip


def test_sdar_greedy_is_top_k_1_at_positive_temperature():
    s = settings("sdar-greedy")  # SDAR issue 1: "greedy" = top-k 1 with T > 0; issues 10/12: 4,096 tokens
    assert s["top_k"] == 1 and s["temperature"] > 0 and s["max_new_tokens"] == 4096 and s["k"] == 1
    assert s["strategy"] == "low_confidence_static" and (s["block_size"], s["denoising_steps"]) == (4, 4)


def test_trado_reports_static_and_dynamic_with_3_samples_and_2000_tokens():
    # dLLM-RL configs/rl_trado.yaml `evaluation`: top_k [0, 1] with [dynamic, static], 3 samples, 2,000 tokens
    assert [d.name for d in PROTOCOLS["trado"].decodings] == ["static", "dynamic"]
    static, dynamic = settings("trado", "static"), settings("trado", "dynamic")
    assert static["k"] == dynamic["k"] == 3 and static["max_new_tokens"] == dynamic["max_new_tokens"] == 2000
    assert (static["top_k"], static["strategy"]) == (1, "low_confidence_static")
    assert (dynamic["top_k"], dynamic["strategy"], dynamic["confidence_threshold"]) == (
        0, "low_confidence_dynamic", 0.9)  # fmt: skip


def test_lightningrl_is_greedy_block_32_and_reports_tpf_aup_tokens_per_second():
    s = settings("lightningrl")  # configs/lightningrl.yaml: block 32, 32 steps per block, 8,192 tokens; greedy eval
    assert s["temperature"] == 0.0 and s["k"] == 1 and (s["block_size"], s["denoising_steps"]) == (32, 32)
    assert s["max_new_tokens"] == 8192
    assert {"tokens_per_forward", "aup", "tokens_per_second"} <= set(PROTOCOLS["lightningrl"].metrics)


def test_explicit_flags_override_one_setting_and_bad_ones_name_the_field():
    p = apply_overrides(get_protocol("trado"), 5, {"max_new_tokens": 64, "top_k": None})
    assert p.k == 5 and all(d.params.max_new_tokens == 64 for d in p.decodings)
    assert [d.params.top_k for d in p.decodings] == [1, 0]  # not given: the protocol's own
    with pytest.raises(ValidationError, match="temperature"):
        apply_overrides(get_protocol("dirl"), None, {"temperature": -1.0})
    with pytest.raises(ValueError, match="--protocol: one of dirl, sdar-greedy, trado, lightningrl"):
        get_protocol("dream")


def test_the_docs_and_readme_hold_the_protocol_table_the_code_uses():
    table = protocol_table()
    for doc in (REPO / "docs" / "evaluation.md", REPO / "README.md"):
        assert table in doc.read_text(), f"{doc.name}: regenerate with services.eval.protocols.protocol_table()"


# --------------------------------------------------------------------------- bootstrap


def test_percentile_interpolates_like_numpy():
    assert percentile([0.0, 1.0, 2.0, 3.0], 0.5) == 1.5 and percentile([5.0], 0.975) == 5.0
    assert percentile([0.0, 10.0], 0.25) == 2.5


def test_bootstrap_of_identical_questions_is_a_point():
    assert bootstrap_ci([0.5] * 7) == (0.5, 0.5)
    assert bootstrap_ci([]) == (0.0, 0.0)


def test_bootstrap_ends_on_hand_derived_cases():
    # two questions 0 and 1: a resample's mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so both 2.5% tails
    # fall on the extremes
    assert bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    # [0, 0, 0, 1]: P(mean = 0) = (3/4)^4 = 0.32 > 0.025, so the low end is 0; P(mean = 1) = (1/4)^4 = 0.004 < 0.025
    # but P(mean >= 0.75) = 4 (1/4)^3 (3/4) + (1/4)^4 = 0.051 > 0.025, so the high end is 0.75
    assert bootstrap_ci([0.0, 0.0, 0.0, 1.0]) == (0.0, 0.75)


def test_paired_bootstrap_cancels_the_spread_between_questions():
    a = [0.0, 1.0, 0.0, 1.0, 0.5, 0.25]
    b = [x + 0.25 for x in a]
    diff, low, high = paired_bootstrap_ci(a, b)
    assert math.isclose(diff, 0.25) and math.isclose(low, 0.25) and math.isclose(high, 0.25)
    lo_a, hi_a = bootstrap_ci(a)
    lo_b, hi_b = bootstrap_ci(b)
    assert hi_a - lo_a > 0.5 and lo_b < hi_a  # unpaired, the two runs' intervals overlap
    # one question of three gained a whole point: the difference is 1/3, and the interval spans 0 .. 2/3 or more
    diff, low, high = paired_bootstrap_ci([0.0, 0.0, 0.0], [1.0, 0.0, 0.0])
    assert math.isclose(diff, 1 / 3) and low == 0.0 and high >= 2 / 3
    with pytest.raises(ValueError, match="3 and 2 questions"):
        paired_bootstrap_ci([0.0] * 3, [0.0] * 2)


# --------------------------------------------------------------------------- AUP


def test_aup_of_one_operating_point_is_tpf_times_accuracy():
    assert aup([(5.58, 90.3)]) == pytest.approx(5.58 * 90.3)


def test_aup_on_hand_derived_curves():
    # no accuracy lost: a plain area, rho_1 y_1 + trapezoid = 1*80 + 2*(80+80)/2
    assert aup([(3.0, 80.0), (1.0, 80.0)]) == pytest.approx(240.0)
    # 85 against the best 90 is weighted by exp(-3 (1 - 85/90)) = exp(-1/6)
    w = math.exp(-1 / 6)
    assert aup_weight(85.0, 90.0) == pytest.approx(w)
    assert aup([(2.0, 90.0), (4.0, 85.0)]) == pytest.approx(2 * 90 + 2 * (90 + 85 * w) / 2)
    # a point more than 5 below the first one's accuracy is dropped: fast but wrong earns nothing
    assert aup([(1.0, 90.0), (8.0, 60.0)]) == pytest.approx(90.0)
    with pytest.raises(ValueError, match="tokens per forward"):
        aup([(0.0, 50.0)])


def test_an_aup_sweep_decodes_once_per_threshold():
    from services.eval.protocols import sweep

    p = sweep(get_protocol("lightningrl"), [0.9, 0.5])
    assert [d.name for d in p.decodings] == ["greedy@0.9", "greedy@0.5"]
    assert [d.params.confidence_threshold for d in p.decodings] == [0.9, 0.5]
    assert all(d.params.temperature == 0.0 and d.params.block_size == 32 for d in p.decodings)
    with pytest.raises(ValueError, match="--aup-thresholds"):
        sweep(get_protocol("dirl"), [1.5])
