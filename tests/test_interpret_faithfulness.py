"""salience.interpret.faithfulness: rank correlations against scipy, the table on hand-made vectors, and
the model-driven references (erasure and gradient x input) checked by direct computation on MiniLM."""

import math

import pytest
import torch

from salience.interpret import faithfulness as F

TEXT = "A man is playing a guitar."
PAIR = "Someone plays music."


@pytest.fixture(scope="module")
def minilm():
    import salience.models

    return salience.models.minilm()


def test_rank_correlations_match_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    for n in (5, 12, 40):
        a = torch.randint(0, 6, (n,), generator=g).double()  # many ties
        b = a + torch.randn(n, generator=g, dtype=torch.float64) * 2
        assert F.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
        assert F.kendall(a, b) == pytest.approx(stats.kendalltau(a, b).statistic, abs=1e-12)


def test_rank_correlation_edge_cases():
    assert F.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert F.kendall([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    assert math.isnan(F.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert math.isnan(F.kendall([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]))
    with pytest.raises(ValueError, match="same length"):
        F.spearman([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="1-D"):
        F.kendall(torch.ones(2, 2), torch.ones(2, 2))


def test_chance_band_is_the_null_quantile():
    b10, b40 = F.chance_band(10), F.chance_band(40)
    # exact two-sided 5% critical values of Spearman: n=10 ~ 0.648, n=40 ~ 0.31
    assert 0.58 < b10["spearman"] < 0.70 and 0.27 < b40["spearman"] < 0.36
    assert b40["kendall"] < b10["kendall"] < b10["spearman"]
    assert F.chance_band(10) == b10  # fixed seed
    with pytest.raises(ValueError, match="n must be an int >= 3"):
        F.chance_band(2)


def test_compare_table_by_hand():
    ref = {"gradient_x_input": torch.tensor([9.0, 1.0, 2.0, 3.0, 4.0]),
           "erasure": torch.tensor([9.0, 4.0, 3.0, 2.0, 1.0])}
    imps = {"rollout": torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4]),
            # equal up to float noise: must tie, not be ranked by the noise
            "uniform": torch.tensor([0.0, 0.25, 0.25 + 1e-15, 0.25 - 1e-15, 0.25]),
            "flow": None}
    rep = F.compare(imps, ref, positions=[1, 2, 3, 4], tokens=list("abcde"), target="toy")
    assert rep.correlations["rollout"]["gradient_x_input"] == {"spearman": pytest.approx(1.0),
                                                              "kendall": pytest.approx(1.0)}
    assert rep.correlations["rollout"]["erasure"]["spearman"] == pytest.approx(-1.0)
    assert rep.constant == ["uniform"] and rep.correlations["uniform"]["erasure"]["spearman"] == 0.0
    assert rep.skipped == {"flow": "not computed"}
    assert rep.reference_agreement["spearman"] == pytest.approx(-1.0)
    assert rep.best("gradient_x_input") == ("rollout", pytest.approx(1.0))
    text = rep.table()
    assert "rollout" in text and "no ranking" in text and "chance band" in text and "n/a" in text
    assert len(rep.markdown().splitlines()) == 2 + 3  # header, separator, rollout, uniform, skipped flow
    d = rep.to_dict()
    assert d["rows"][0]["method"] == "rollout" and d["verdict"] == rep.verdict()
    # the Markdown table renders the same from the report and from its JSON (what docs_tables.py keeps)
    import json

    kept = json.loads(json.dumps(d))
    assert F.markdown_table(kept) == rep.markdown()
    row = rep.markdown().splitlines()[2]
    assert row == "| rollout | +1.00 | +1.00 | -1.00 | -1.00 |  |"
    summary = F.markdown_table(kept, summary=True)
    assert "Chance band (95%, 4 tokens)" in summary and "agree with each other at Spearman -1.00" in summary
    assert summary.endswith(rep.verdict())


def _ranked(s, seed, n=30):
    """``arange(n)`` plus Gaussian noise of scale ``s``: a ranking that agrees with ``arange(n)`` to a degree."""
    g = torch.Generator().manual_seed(seed)
    return torch.arange(n, dtype=torch.float64) + torch.randn(n, generator=g, dtype=torch.float64) * s


def test_grade_thresholds():
    # own grade: chance band first, then |r| < MODERATE weak, < STRONG moderate, else strong
    assert F.grade(0.38, 0.25) == "weak" and F.grade(0.5, 0.25) == "moderate" and F.grade(0.7, 0.25) == "strong"
    assert F.grade(0.5, 0.62) == "no better than chance" and F.grade(-0.8, 0.62) == "inverted"
    assert F.grade(float("nan"), 0.3) == "undefined"
    # capped by the references' own agreement; inconclusive when that is within chance or inverted
    assert F.grade(0.9, 0.3, 0.8) == "strong" and F.grade(0.9, 0.3, 0.5) == "moderate"
    assert F.grade(0.9, 0.3, 0.35) == "weak" and F.grade(0.38, 0.25, 0.9) == "weak"
    assert F.grade(0.84, 0.62, 0.08) == "inconclusive" and F.grade(0.84, 0.62, -0.7) == "inconclusive"
    # a method within chance stays there whatever the references do
    assert F.grade(0.2, 0.3, 0.1) == "no better than chance"


@pytest.mark.parametrize("case", ["strong", "capped", "references disagree", "inverted", "chance"])
def test_verdict_follows_the_evidence(case):
    x = torch.arange(30, dtype=torch.float64)
    erasure, gxi, method = {
        "strong": (x, _ranked(3, 0), _ranked(3, 1)),  # references +0.94, method +0.96
        "capped": (x, _ranked(15, 2), x),  # references +0.54 (moderate), method +1.00
        "references disagree": (x, _ranked(60, 2), x),  # references +0.12 (within chance), method +1.00
        "inverted": (x, _ranked(3, 0), -x),
        "chance": (x, _ranked(3, 0), _ranked(60, 2)),  # method +0.12
    }[case]
    rep = F.compare({"grad_attention": method, "uniform": torch.ones(30)},
                    {"gradient_x_input": gxi, "erasure": erasure})
    ra = rep.reference_agreement["spearman"]
    r = rep.correlations["grad_attention"]["erasure"]["spearman"]
    ch = rep.chance["spearman"]
    assert 0.30 < ch < 0.40  # 30 tokens
    text = rep.verdict()
    # the sample size and the chance band are always stated
    assert "n = 30 tokens" in text and f"|Spearman| <= {ch:.2f}" in text and "closest of 1 method to leave-one-out erasure" in text
    want = {"strong": "strong", "capped": "moderate", "references disagree": "inconclusive", "inverted": "inverted",
            "chance": "no better than chance"}[case]
    assert rep.verdict_grade() == want and rep.to_dict()["verdict_grade"] == want
    if case == "strong":
        assert ra > 0.9 and r > 0.9 and text.endswith("attention explains this output strongly.")
    else:
        assert "strongly" not in text
    if case == "capped":
        assert 0.4 < ra < 0.7 and r == pytest.approx(1.0)
        assert "caps the verdict" in text and text.endswith("moderately.")
    if case == "references disagree":
        assert abs(ra) < ch and f"agree only at Spearman {ra:+.2f} (inside the chance band)" in text
        assert "the evidence is inconclusive" in text
    if case == "inverted":
        assert "inversely" in text
    if case == "chance":
        assert abs(r) < ch and text.endswith("no better than chance.")


def test_verdict_with_one_reference_is_graded_alone():
    rep = F.compare({"rollout": _ranked(8, 0)}, {"erasure": torch.arange(30, dtype=torch.float64)})
    assert rep.verdict_grade() == "strong" and "n = 30 tokens" in rep.verdict()
    assert rep.verdict().startswith("rollout is the closest of 1 method to leave-one-out erasure")


def test_compare_errors():
    with pytest.raises(ValueError, match="references is empty"):
        F.compare({"a": torch.ones(3)}, {})
    with pytest.raises(ValueError, match="at least 3 scored tokens"):
        F.compare({"a": torch.rand(4)}, {"e": torch.rand(4)}, positions=[0, 1])
    with pytest.raises(ValueError, match="has 3 values"):
        F.compare({"a": torch.rand(3)}, {"e": torch.rand(4)})
    with pytest.raises(ValueError, match="out of range"):
        F.compare({"a": torch.rand(4)}, {"e": torch.rand(4)}, positions=[0, 1, 9])


def _sentence(model, ids):
    from salience.models import mean_pool

    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    return torch.nn.functional.normalize(mean_pool(h, torch.ones_like(ids)), dim=-1)[0]


def test_similarity_references_by_direct_computation(minilm):
    model, tok = minilm
    rep = F.evaluate(model, tok, TEXT, pair=PAIR)
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    other = _sentence(model, tok(PAIR, return_tensors="pt")["input_ids"])
    f0 = float(_sentence(model, ids) @ other)
    assert rep.positions == list(range(1, ids.shape[1] - 1))  # [CLS] and [SEP] left out
    for i in (1, 3):  # erasure = |F(x) - F(x without token i)|, recomputed from token ids
        ids_i = torch.cat([ids[:, :i], ids[:, i + 1:]], 1)
        assert rep.references["erasure"][i].item() == pytest.approx(abs(f0 - float(_sentence(model, ids_i) @ other)),
                                                                   abs=2e-5)
    # gradient x input = d/dt F(token i's embedding scaled by t) at t = 1: check by a central difference
    emb = model.get_input_embeddings()(ids).detach()
    from salience.models import mean_pool

    def f(E):
        with torch.no_grad():
            h = model(inputs_embeds=E, attention_mask=torch.ones_like(ids)).last_hidden_state
        return float(torch.nn.functional.normalize(mean_pool(h, torch.ones_like(ids)), dim=-1)[0] @ other)

    i, eps = 2, 1e-2
    up, down = emb.clone(), emb.clone()
    up[0, i] *= 1 + eps
    down[0, i] *= 1 - eps
    fd = abs(f(up) - f(down)) / (2 * eps)
    assert rep.references["gradient_x_input"][i].item() == pytest.approx(fd, rel=2e-2, abs=1e-5)
    assert set(rep.correlations) == {"raw_last", "raw_mean", "rollout", "flow", "grad_attention", "uniform"}
    assert all(math.isfinite(c["erasure"]["spearman"]) for c in rep.correlations.values())
    assert "cosine similarity" in rep.target and rep.attn.shape == (6, 12, ids.shape[1], ids.shape[1])
    # gradient x attention without the identity: no 1/L floor under every token (that made it flat), a spread
    ga = rep.importances["grad_attention"][rep.positions]
    assert float(ga.min()) >= 0 and float(ga.max()) < 0.1 / ids.shape[1] and float(ga.max()) > 2 * float(ga.min())


def test_shift_target_erasure_by_direct_computation(minilm):
    model, tok = minilm
    rep = F.evaluate(model, tok, TEXT, methods=("rollout", "grad_attention", "uniform"))
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    e0 = _sentence(model, ids)
    i = 4
    ids_i = torch.cat([ids[:, :i], ids[:, i + 1:]], 1)
    assert rep.references["erasure"][i].item() == pytest.approx(1 - float(_sentence(model, ids_i) @ e0), abs=2e-5)
    assert "grad_attention" in rep.skipped and "zero gradient" in rep.skipped["grad_attention"]
    assert "uniform" in rep.constant  # uniform attention over a bidirectional encoder ranks nothing
    assert "embedding shift" in rep.target


def test_classifier_target(minilm):
    from transformers import BertConfig, BertForSequenceClassification

    _, tok = minilm
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=3)
    clf = BertForSequenceClassification(cfg).eval()
    import salience.integrations.hf as shf

    shf.enable(clf)
    rep = F.evaluate(clf, tok, TEXT, label=2)
    assert rep.target.startswith("logit of class 2")
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        f0 = clf(input_ids=ids).logits[0, 2]
        ids_i = torch.cat([ids[:, :1], ids[:, 2:]], 1)
        f1 = clf(input_ids=ids_i).logits[0, 2]
    assert rep.references["erasure"][1].item() == pytest.approx(abs(float(f0 - f1)), abs=1e-5)
    assert rep.attn.shape == (2, 4, ids.shape[1], ids.shape[1])
    with pytest.raises(ValueError, match="label must be a class index"):
        F.evaluate(clf, tok, TEXT, label=3)


def test_evaluate_errors(minilm):
    model, tok = minilm
    with pytest.raises(ValueError, match="text must be a non-empty string"):
        F.evaluate(model, tok, "  ")
    with pytest.raises(ValueError, match="pair must be"):
        F.evaluate(model, tok, TEXT, pair="")
    with pytest.raises(ValueError, match="kind must be one of"):
        F.evaluate(model, tok, TEXT, kind="regression")
    with pytest.raises(ValueError, match="needs pair="):
        F.evaluate(model, tok, TEXT, kind="similarity")
    with pytest.raises(ValueError, match="ForSequenceClassification"):
        F.evaluate(model, tok, TEXT, kind="classifier")
    with pytest.raises(ValueError, match="above max_tokens=4"):
        F.evaluate(model, tok, TEXT, max_tokens=4)
    with pytest.raises(ValueError, match="unknown method"):
        F.attention_importances(torch.full((1, 1, 3, 3), 1 / 3), "mean", methods=("lime",))
