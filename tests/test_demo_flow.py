"""salience.demos.agreement and salience.demos.flow: the task generator, blank-out and gradient importance on a
hand-checkable model, rollout and flow against a direct computation, and a tiny end-to-end run."""

from __future__ import annotations

import json
from collections import deque

import pytest
import torch

from salience.demos import agreement as A
from salience.demos import flow as F

NOUN_NUMBER = {w: n for pair in A.NOUNS for n, w in enumerate(pair)}
RC_NUMBER = {w: n for pair in A.RC_VERBS for n, w in enumerate(pair)}
DET_NUMBER = {w: n for n, ws in enumerate(A.DETS) for w in ws}


def _examples(n=300, seed=0, **kw):
    task = A.Agreement(**kw)
    return task, task.sample(n, torch.Generator().manual_seed(seed))


def test_generator_structure_labels_and_attractors():
    task, exs = _examples()
    for e in exs:
        t = e.tokens
        assert t[0] == "[CLS]" and all(w in task.index for w in t)
        # the subject is a noun whose number is the label; it is the first noun after any preamble
        assert NOUN_NUMBER[t[e.subject]] == e.label
        if "said" in t:
            assert t.index("said") < e.subject
        else:
            assert all(w not in NOUN_NUMBER for w in t[: e.subject])
        # intervening nouns: exactly the nouns after the subject; attractors are those of the other number
        after = [i for i in range(e.subject + 1, len(t)) if t[i] in NOUN_NUMBER]
        assert after == e.noun_positions and len(after) == e.phrases
        assert e.attractor_positions == [i for i in after if NOUN_NUMBER[t[i]] != e.label]
        assert e.attractors == len(e.attractor_positions)
        # determiners agree with their noun; a relative clause's verb agrees with the clause's own noun
        for i, w in enumerate(t):
            if w in DET_NUMBER:
                j = next(k for k in range(i + 1, len(t)) if t[k] in NOUN_NUMBER)
                assert DET_NUMBER[w] == NOUN_NUMBER[t[j]]
            if w in RC_NUMBER and i > e.subject:  # ("everyone knows that" is a preamble)
                assert RC_NUMBER[w] == NOUN_NUMBER[t[i - 1]]
        assert e.sentence().endswith("[is]" if e.label == A.SINGULAR else "[are]")
    st = A.statistics(exs)
    assert st["examples"] == 300 and sum(st["by_attractors"].values()) == 300
    assert set(st["by_attractors"]) <= {"0", "1", "2", "3", "4"} and len(st["by_attractors"]) >= 4
    assert 0.35 < st["plural_share"] < 0.65 and len(st["subject_positions"]) > 3


def test_generator_fixed_phrases_all_attractors_and_batch():
    task = A.Agreement(attractor_p=1.0, seed=0)
    g = torch.Generator().manual_seed(1)
    exs = [task.example(g, phrases=3) for _ in range(20)]
    assert all(e.phrases == 3 and e.attractors == 3 for e in exs)
    ids, lengths, labels = task.batch(exs)
    assert ids.shape == (20, int(lengths.max())) and bool((ids[:, 0] == A.CLS).all())
    assert labels.tolist() == [e.label for e in exs]
    assert task.decode(ids[0]) == exs[0].tokens
    none = A.Agreement(attractor_p=0.0, seed=0).sample(50, g)
    assert all(e.attractors == 0 for e in none)
    with pytest.raises(ValueError, match="sum to 1"):
        A.Agreement(phrase_probs=(0.5, 0.2))


def test_blank_out_and_input_gradient_on_a_linear_model():
    # F(ids) = sum_i w . emb[ids_i]: blank-out of token i is |w . (emb[UNK] - emb[x_i])|, gradient x input |w . emb[x_i]|
    emb = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [2.0, 1.0], [-1.0, 3.0]], dtype=torch.float64)
    w = torch.tensor([1.0, 2.0], dtype=torch.float64)
    ids = torch.tensor([A.CLS, 3, 4, 3])

    def score_ids(x):
        return (emb[x] @ w).sum(-1)

    bo = F.blank_out(score_ids, ids)
    # w.emb: UNK 1, token3 4, token4 5 -> |1-4| = 3, |1-5| = 4; [CLS] skipped
    assert bo.tolist() == [0.0, 3.0, 4.0, 3.0]
    assert F.blank_out(score_ids, ids, skip=()).tolist() == [1.0, 3.0, 4.0, 3.0]
    gi = F.input_gradient(lambda E: (E @ w).sum(-1), emb[ids])
    assert gi.tolist() == [0.0, 4.0, 5.0, 4.0]
    # a quadratic: F = sum_i (w . x_i)^2, dF/dx_i = 2 (w . x_i) w, gradient x input 2 (w . x_i)^2
    gq = F.input_gradient(lambda E: ((E @ w) ** 2).sum(-1), emb[ids])
    assert torch.allclose(gq, torch.tensor([0.0, 32.0, 50.0, 32.0], dtype=torch.float64))


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    task = A.Agreement(seed=seed)
    model = F.AgreementClassifier(task.vocab_size, d_model=16, num_heads=2, num_layers=3, max_len=32).eval()
    ex = task.example(torch.Generator().manual_seed(seed + 5), phrases=2)
    return task, model, torch.tensor(task.encode(ex.tokens))


def _max_flow(cap: dict, s, t) -> float:
    """Edmonds-Karp on a dict-of-dicts of capacities (the test's own direct computation)."""
    res: dict = {}
    for u, vs in cap.items():
        for v, c in vs.items():
            res.setdefault(u, {})[v] = res.get(u, {}).get(v, 0.0) + c
            res.setdefault(v, {}).setdefault(u, 0.0)
    total = 0.0
    while True:
        parent = {s: None}
        q = deque([s])
        while q and t not in parent:
            u = q.popleft()
            for v, c in res.get(u, {}).items():
                if c > 1e-15 and v not in parent:
                    parent[v] = u
                    q.append(v)
        if t not in parent:
            return total
        path, v = [], t
        while parent[v] is not None:
            path.append((parent[v], v))
            v = parent[v]
        aug = min(res[u][v] for u, v in path)
        for u, v in path:
            res[u][v] -= aug
            res[v][u] += aug
        total += aug


def test_rollout_and_flow_on_a_tiny_model_equal_a_direct_computation():
    _, model, ids = _tiny_model()
    imp = F.importances(model, ids)
    attn = imp["attn"]
    n, H, L, _ = attn.shape
    assert n == 3 and H == 2 and L == ids.numel()
    # the captured maps are the model's: the explicit pass (used for gradients) reproduces its logits
    with torch.no_grad():
        logits, _ = model.explicit(model.embed(ids.view(1, -1)))
        assert torch.allclose(logits, model(ids.view(1, -1)), atol=1e-5)
    scores = F.layer_scores(attn, imp["grads"], 0)
    aug = [(attn[layer].mean(0) + torch.eye(L, dtype=torch.float64)) / 2 for layer in range(n)]
    roll = torch.eye(L, dtype=torch.float64)
    for layer in range(n):
        roll = aug[layer] @ roll  # rollout up to this layer, by hand
        assert torch.allclose(scores["rollout"][layer], roll[0], atol=1e-10)
        assert torch.allclose(scores["raw"][layer], attn[layer].mean(0)[0], atol=1e-10)
        cap: dict = {}
        for k in range(layer + 1):
            for i in range(L):
                for j in range(L):
                    cap.setdefault((k + 1, i), {})[(k, j)] = float(aug[k][i, j])
        direct = [_max_flow(cap, (layer + 1, 0), (0, j)) for j in range(L)]
        assert torch.allclose(scores["flow"][layer], torch.tensor(direct, dtype=torch.float64), atol=1e-6)
        try:
            import networkx as nx
        except ImportError:
            continue
        if layer == n - 1:
            g = nx.DiGraph()
            for u, vs in cap.items():
                for v, c in vs.items():
                    g.add_edge(u, v, capacity=c)
            nxf = [nx.maximum_flow_value(g, (n, 0), (0, j)) for j in range(L)]
            assert torch.allclose(scores["flow"][layer], torch.tensor(nxf, dtype=torch.float64), atol=1e-6)
    # the importances are what the test's own definitions give
    pred = imp["pred"]
    with torch.no_grad():
        f0 = model(ids.view(1, -1))[0]
        for i in (1, L - 1):
            b = ids.clone()
            b[i] = A.UNK
            fb = model(b.view(1, -1))[0]
            m0, mb = f0[pred] - f0[1 - pred], fb[pred] - fb[1 - pred]
            assert abs(imp["blank_out"][i] - abs(float(mb - m0))) < 1e-5
    assert imp["blank_out"][0] == 0 and imp["input_gradient"][0] == 0
    assert bool((scores["grad_attention"] >= 0).all())


def test_correlations_and_bootstrap_summary():
    L = 6
    per = []
    for _ in range(5):
        ref = torch.arange(L, dtype=torch.float64)
        per.append({"scores": {"raw": torch.stack([ref, -ref]), "rollout": torch.stack([ref, ref])},
                    "blank_out": ref, "input_gradient": ref.flip(0)})
    c = F.correlations(per, lambda i: torch.arange(1, L), reps=50)
    assert c["blank_out"]["raw"][0]["mean"] == pytest.approx(1.0)
    assert c["blank_out"]["raw"][1]["mean"] == pytest.approx(-1.0)
    assert c["input_gradient"]["rollout"][1]["mean"] == pytest.approx(-1.0)
    s = c["blank_out"]["rollout"][0]
    assert s["lo"] == pytest.approx(1.0) and s["hi"] == pytest.approx(1.0) and s["n"] == 5
    assert c["references"]["mean"] == pytest.approx(-1.0)
    assert c["tied_at_max"]["raw"] == pytest.approx([1 / 5, 1 / 5])  # one maximum among 5 scored tokens
    per[0]["scores"]["raw"] = torch.ones(2, L, dtype=torch.float64)  # constant: all tied, correlation counted 0
    c = F.correlations(per, lambda i: torch.arange(1, L), reps=50)
    assert c["tied_at_max"]["raw"][0] == pytest.approx((1 + 4 / 5) / 5)
    assert c["blank_out"]["raw"][0]["mean"] == pytest.approx(4 / 5)


def test_tiny_end_to_end_run_writes_json_png_and_markdown(tmp_path):
    pytest.importorskip("matplotlib")
    res = F.run_flow(quick=True, out=tmp_path, say=lambda *_: None, minilm=False, train_steps=2, eval_examples=3,
                     test_examples=20, bootstrap=20, model_kw={"d_model": 16, "num_heads": 2, "num_layers": 2})
    data = json.loads((tmp_path / "flow.json").read_text())
    assert (tmp_path / "flow.png").stat().st_size > 1000
    assert set(data["agreement"]) == {"blank_out", "input_gradient", "references", "tied_at_max"}
    assert all(0 < v <= 1 for v in data["agreement"]["tied_at_max"]["flow"])
    assert len(data["agreement"]["blank_out"]["flow"]) == 2 and data["model"]["layers"] == 2
    assert data["task"]["statistics"]["test"]["examples"] == 20 and "all" in data["accuracy"]
    md = F.markdown(data)
    assert "| paper, layer 6 | 0.29 | 0.71 | 0.70 | - |" in md and "| layer 2 |" in md
    assert res["settings"]["train_steps"] == 2


def test_demo_cli_accepts_the_flow_part():
    import argparse

    from salience.demos.cli import _command, add_arguments, settings

    p = argparse.ArgumentParser()
    add_arguments(p)
    s = settings(p.parse_args(["--quick", "--parts", "flow"]))
    assert s["parts"] == ["flow"] and "--parts flow" in _command(s)
    assert "--parts" not in _command(settings(p.parse_args(["--quick"])))


def test_minilm_part_is_skipped_without_the_hf_extra(tmp_path, monkeypatch):
    def missing(*_a, **_k):
        raise ImportError("no transformers here")

    monkeypatch.setattr(F, "minilm_correlations", missing)
    said = []
    res = F.run_flow(quick=True, out=None, say=said.append, train_steps=1, eval_examples=2, test_examples=8,
                     bootstrap=10, model_kw={"d_model": 8, "num_heads": 2, "num_layers": 1})
    assert "minilm" not in res and "no transformers here" in res["minilm_skipped"]
    assert any("MiniLM part skipped" in s for s in said)
