"""Attention during generation (causal LMs), the sentence-pair view and encoder-decoder cross-attention views.

The browser checks need headless Chromium (Debian: ``apt-get install -y chromium``) and are skipped without it.
"""

import json
import re
import shutil
import subprocess

import pytest
import torch

transformers = pytest.importorskip("transformers")

import salience.integrations.hf as shf  # noqa: E402
from salience.interpret.generation import generation_attention  # noqa: E402


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=40, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("make", [_gpt2, _llama])
def test_generation_rows_equal_eager_full_forward(make):
    model = shf.enable(make())
    prompt = torch.tensor([[3, 5, 7, 9]])
    g = generation_attention(model, prompt, max_new_tokens=5, min_new_tokens=5)
    P = 4
    assert g.prompt_length == P and len(g.ids) == P + 5 and g.ids[:P] == prompt[0].tolist() and len(g.steps) == 5
    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(torch.tensor([g.ids]), output_attentions=True).attentions
    full = torch.stack([a[0] for a in att])  # (layers, H, L, L)
    for t, s in enumerate(g.steps):
        p = g.row_position(t)
        assert p == P - 1 + t and s.shape == (full.shape[0], full.shape[1], p + 1)
        torch.testing.assert_close(s, full[:, :, p, : p + 1], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(s.sum(-1), torch.ones(s.shape[:2]), atol=1e-5, rtol=0)


def test_generation_refusals():
    model = shf.enable(_gpt2())
    with pytest.raises(ValueError, match="batch size 1"):
        generation_attention(model, torch.tensor([[1, 2], [3, 4]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="tokenizer"):
        generation_attention(model, "hello", max_new_tokens=2)
    model.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="emits no attention events"):
        generation_attention(model, torch.tensor([[1, 2]]), max_new_tokens=2)


def _chromium():
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install -y chromium)")
    return exe


def _dom(tmp_path, uri):
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=6000", "--dump-dom", uri]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_generation_view_html_and_chromium(tmp_path):
    model = shf.enable(_gpt2())
    g = generation_attention(model, [3, 5, 7], max_new_tokens=4, min_new_tokens=4)
    page = g.report()
    assert 'id="gen-step"' in page and 'id="salience-gen-data"' in page and "Generation view" in page
    assert "http://" not in page and "https://" not in page  # self-contained
    assert page._repr_html_().startswith("<iframe srcdoc=")
    path = g.report(tmp_path / "gen.html")
    dom = _dom(tmp_path, path.as_uri() + "#selftest")
    assert dom.returncode == 0 and 'data-ready="1"' in dom.stdout and 'data-errors=' not in dom.stdout, dom.stderr[-2000:]
    # one step per generated token, each over all earlier positions (3, 4, 5, 6 keys)
    assert re.search(r'data-selftest="keys=3,4,5,6"', dom.stdout), re.findall(r'data-selftest="[^"]*"', dom.stdout)


# ------------------------------------------------------------------------------------ sentence pair


def test_pair_cross_mass_hand_case_and_page():
    from salience.interpret.pair import PairAttention

    m = torch.zeros(1, 2, 4, 4)
    m[0, 0] = torch.tensor([[0.5, 0.0, 0.5, 0.0], [1.0, 0, 0, 0], [0, 0, 1.0, 0], [0.25, 0.25, 0.25, 0.25]])
    m[0, 1] = torch.eye(4)
    pa = PairAttention(tokens=["a1", "a2", "b1", "b2"], side=[0, 0, 1, 1], maps=m)
    cm = pa.cross_mass()
    torch.testing.assert_close(cm["a_to_b"], torch.tensor([[0.25, 0.0]]))
    torch.testing.assert_close(cm["b_to_a"], torch.tensor([[0.25, 0.0]]))
    page = pa.report()
    assert "Sentence A" in page and "Sentence B" in page and 'id="pair-svg"' in page and "Cross-sentence share" in page
    with pytest.raises(ValueError, match="both present"):
        PairAttention(tokens=["a", "b"], side=[0, 0], maps=torch.ones(1, 1, 2, 2))


def test_explain_pair_puts_the_joint_pair_view_in_the_report(tmp_path):
    from salience import cli

    out = tmp_path / "r"
    assert cli.main(["explain", "A man plays a guitar.", "--pair", "Someone makes music.", "--method", "rollout",
                     "--no-png", "--quiet", "--out", str(out)]) == 0
    assert not (out / "pair.html").exists()  # one report: the pair is a tab of report.html
    page = (out / "report.html").read_text()
    data = json.loads(re.search(r'id="salience-pair-data">(.*?)</script>', page, re.S).group(1).replace("<\\/", "</"))
    toks, side = data["tokens"], data["side"]
    assert toks[0] == "[CLS]" and "guitar" in toks and "music" in toks and toks.count("[SEP]") == 2
    assert side[toks.index("guitar")] == 0 and side[toks.index("music")] == 1  # one joint input, A then B
    assert len(data["maps"][0][0]) == len(toks) and data["layers"] == 6
    assert all(0 < x < 1 for x in data["a_to_b"][0])
    dom = _dom(tmp_path, (out / "report.html").as_uri() + "#selftest")
    assert 'data-ready="1"' in dom.stdout and "data-errors=" not in dom.stdout
    sel = re.search(r'data-selftest="ab=(\d+),ba=(\d+),all=(\d+)"', dom.stdout)
    assert sel and int(sel.group(1)) > 0 and int(sel.group(2)) > 0 and int(sel.group(3)) > 0


# ------------------------------------------------------------------------------------ encoder-decoder


def _bart():
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(2)
    cfg = BartConfig(vocab_size=50, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64)
    return BartForConditionalGeneration(cfg).eval()


def test_bart_cross_attention_equals_eager_and_renders(tmp_path):
    from salience.interpret.seq2seq import cross_attention

    model = shf.enable(_bart())
    x, y = torch.tensor([[0, 5, 6, 7, 8, 2]]), torch.tensor([[2, 0, 9, 10]])
    ca = cross_attention(model, y, x)
    assert ca.maps.shape == (2, 2, 4, 6) and ca.source == ["0", "5", "6", "7", "8", "2"] and ca.target == ["2", "0", "9", "10"]
    assert all("encoder_attn" in n for n in ca.layer_names)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = torch.stack([a[0] for a in model(input_ids=x, decoder_input_ids=y, output_attentions=True).cross_attentions])
    torch.testing.assert_close(ca.maps, ref, atol=1e-5, rtol=1e-4)
    page = ca.report()
    assert "Cross-attention view" in page and "decoder (queries)" in page and "encoder (keys)" in page
    path = ca.report(tmp_path / "cross.html")
    dom = _dom(tmp_path, path.as_uri())
    assert 'data-ready="1"' in dom.stdout and "data-errors=" not in dom.stdout
    xl = re.search(r'<canvas[^>]*id="cx"[^>]*data-xlabels="([^"]*)"[^>]*data-ylabels="([^"]*)"', dom.stdout)
    assert xl and xl.group(1).split("|") == ca.source and xl.group(2).split("|") == ca.target


def test_cross_attention_refuses_decoder_only():
    from salience.interpret.seq2seq import cross_attention

    with pytest.raises(ValueError, match="encoder-decoder"):
        cross_attention(shf.enable(_gpt2()), torch.tensor([[1, 2]]), torch.tensor([[1, 2]]))


def test_t5_cross_attention_equals_eager():
    from transformers import T5Config, T5ForConditionalGeneration

    from salience.interpret.seq2seq import cross_attention

    torch.manual_seed(3)
    cfg = T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
                   decoder_start_token_id=0)
    model = shf.enable(T5ForConditionalGeneration(cfg).eval())
    x, y = torch.tensor([[5, 6, 7, 8, 1]]), torch.tensor([[0, 9, 10]])
    ca = cross_attention(model, y, x)
    assert ca.maps.shape == (2, 2, 3, 5) and all("EncDecAttention" in n for n in ca.layer_names)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = torch.stack([a[0] for a in model(input_ids=x, decoder_input_ids=y, output_attentions=True).cross_attentions])
    torch.testing.assert_close(ca.maps, ref, atol=1e-5, rtol=1e-4)


def test_generation_refuses_encoder_decoder_with_a_reason():
    with pytest.raises(NotImplementedError, match="cross_attention"):
        generation_attention(shf.enable(_bart()), torch.tensor([[0, 5, 2]]), max_new_tokens=2)
