"""One report, several views: ``salience explain`` with ``--generate`` (causal LMs), encoder-decoder models
(cross-attention) and ``--pair``, and the view tabs of ``report.html`` driven in headless Chromium.

The tiny models are built offline from configs (random weights) and saved next to the embedded MiniLM's
tokenizer; the browser checks are skipped without Chromium (Debian: ``apt-get install -y chromium``).
"""

import json
import re
import shutil
import subprocess
from html import unescape as _unescape

import pytest
import torch

pytest.importorskip("transformers")

from salience import cli  # noqa: E402
from salience.interpret.render import html  # noqa: E402
from salience.interpret.render.png import token_labels  # noqa: E402

TEXT = "The cat sat on the mat."


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Directories of a tiny GPT-2, BART and T5 with the MiniLM tokenizer (vocabulary 30,522)."""
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        GPT2Config,
        GPT2LMHeadModel,
        T5Config,
        T5ForConditionalGeneration,
    )

    import salience.models

    _, tok = salience.models.minilm()
    V, root = tok.vocab_size, tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    made = {
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=16, n_layer=2, n_head=2)),
        "bart": BartForConditionalGeneration(BartConfig(
            vocab_size=V, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64)),
        "t5": T5ForConditionalGeneration(T5Config(vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                                  num_decoder_layers=2, num_heads=2, decoder_start_token_id=0)),
    }
    out = {}
    for name, m in made.items():
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    out["tok"] = tok
    return out


def _data(page: str, data_id: str) -> dict:
    m = re.search(rf'<script type="application/json" id="{data_id}">(.*?)</script>', page, re.S)
    assert m, f"no {data_id} in the page"
    return json.loads(m.group(1).replace("<\\/", "</"))


def _chromium():
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install -y chromium)")
    return exe


def _dom(tmp_path, uri: str) -> str:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=8000", "--dump-dom", uri]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "data-errors=" not in r.stdout, r.stderr[-2000:]
    return r.stdout


def _attr(dom: str, element_id: str, name: str) -> str | None:
    m = re.search(rf'<[a-z]+ [^>]*id="{element_id}"[^>]*>', dom)
    assert m, element_id
    a = re.search(rf'\b{name}="([^"]*)"', m.group(0))
    return _unescape(a.group(1)) if a else None


def _hidden(dom: str, element_id: str) -> bool:
    m = re.search(rf'<[a-z]+ [^>]*id="{element_id}"[^>]*>', dom)
    assert m, element_id
    return re.search(r"\shidden(=\"\")?[\s>]", m.group(0)) is not None


def _eager(path, cls):
    m = cls.from_pretrained(str(path), attn_implementation="eager", local_files_only=True).eval()
    return m


# ----------------------------------------------------------------------------------------- causal LM


def test_explain_generate_writes_the_generation_view(models, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "g"
    assert cli.main(["explain", TEXT, "--model", str(models["gpt2"]), "--generate", "4", "--no-png", "--quiet",
                     "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "generated (greedy, 4 tokens)" in text and "step  3" in text
    assert "faithfulness: not computed for a causal LM" in text
    page = (out / "report.html").read_text()
    d = _data(page, "salience-gen-data")
    P = d["prompt_length"]
    assert P == len(models["tok"](TEXT)["input_ids"]) and len(d["steps"]) == 4 and len(d["tokens"]) == P + 4
    assert [len(s[0][0]) for s in d["steps"]] == [P, P + 1, P + 2, P + 3]
    # the page's rows are the eager model's attention rows of the final sequence (what produced each token)
    ids = models["tok"](TEXT)["input_ids"]
    model = _eager(models["gpt2"], AutoModelForCausalLM)
    with torch.no_grad():
        seq = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, pad_token_id=0)
        att = model(seq, output_attentions=True).attentions
    for t, step in enumerate(d["steps"]):
        ref = torch.stack([a[0, :, P - 1 + t, : P + t] for a in att])
        torch.testing.assert_close(torch.tensor(step), ref, atol=2e-5, rtol=0)
    assert _data(page, "salience-data")["views"] == [{"key": "generation", "label": "Generation",
                                                      "section": "gen-sec"}]


def test_generation_view_switches_and_renders_in_chromium(models, tmp_path):
    out = tmp_path / "g"
    assert cli.main(["explain", TEXT, "--model", str(models["gpt2"]), "--generate", "3", "--no-png", "--quiet",
                     "--out", str(out)]) == 0
    uri = (out / "report.html").as_uri()
    dom = _dom(tmp_path, uri + "#selftest")
    assert _attr(dom, "tabs", "data-tabs") == "matrix,head,overlay,generation"
    st = re.search(r'<body[^>]*data-selftest="([^"]*)"', dom).group(1)
    assert st.startswith("ok") and "views=matrix:ok,head:ok,overlay:ok,generation:ok" in st, st
    P = len(models["tok"](TEXT)["input_ids"])
    assert _attr(dom, "gen-sec", "data-selftest") == f"keys={P},{P + 1},{P + 2}"
    # opened on the generation tab: its section shows, the matrix and head views do not
    dom = _dom(tmp_path, uri + "#view=generation")
    assert _attr(dom, "gen-sec", "data-ready") == "1" and re.search(r'<body[^>]*data-view="generation"', dom)
    assert not _hidden(dom, "gen-sec") and _hidden(dom, "mx-panel") and _hidden(dom, "model")
    # labels: the prompt's tokens in the text strip, step 0's bar row over all P prompt positions
    spans = re.findall(r'<span class="tok([^"]*)"[^>]*>([^<]*)</span>', dom)
    assert [s[1] for s in spans[:P]] == models["tok"].convert_ids_to_tokens(models["tok"](TEXT)["input_ids"])
    assert all("prompt" in s[0] for s in spans[:P]) and "cur" in spans[P][0]
    assert _attr(dom, "gen-bars", "data-keys") == str(P)


# ------------------------------------------------------------------------------------ encoder-decoder


def test_explain_bart_cross_attention_of_its_greedy_output(models, tmp_path, capsys):
    from transformers import AutoModelForSeq2SeqLM

    out = tmp_path / "b"
    assert cli.main(["explain", TEXT, "--model", str(models["bart"]), "--generate", "5", "--no-png", "--quiet",
                     "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "decoder output:" in text and "cross-attention, most-attended source token" in text
    page = (out / "report.html").read_text()
    d = _data(page, "salience-cross-data")
    tok, ids = models["tok"], models["tok"](TEXT)["input_ids"]
    assert d["source"] == token_labels(tok.convert_ids_to_tokens(ids)) and "the·1" in d["source"]
    model = _eager(models["bart"], AutoModelForSeq2SeqLM)
    x = torch.tensor([ids])
    with torch.no_grad():
        seq = model.generate(x, max_new_tokens=5, do_sample=False)
        ref = model(input_ids=x, decoder_input_ids=seq[:, :-1], output_attentions=True).cross_attentions
    assert d["target"] == token_labels(tok.convert_ids_to_tokens(seq[0, 1:].tolist()))  # row t produced token t
    torch.testing.assert_close(torch.tensor(d["maps"]), torch.stack([a[0] for a in ref]), atol=2e-5, rtol=0)
    # the matrix and head views hold the encoder's self-attention (2 layers, square over the source)
    main = _data(page, "salience-data")
    assert main["maps"]["layers"] == 2 and main["maps"]["R"] == main["maps"]["S"] == len(ids)
    assert "the encoder's self-attention" in main["summary"]

    dom = _dom(tmp_path, (out / "report.html").as_uri() + "#selftest")
    st = re.search(r'<body[^>]*data-selftest="([^"]*)"', dom).group(1)
    assert st.startswith("ok") and "cross:ok" in st, st
    assert _attr(dom, "cx", "data-xlabels").split("|") == d["source"]
    assert _attr(dom, "cx", "data-ylabels").split("|") == d["target"]
    # the colour scale runs from 0 to the shown map's maximum (layer 0, mean of heads: the page's first choice)
    top = max(sum(h[i][j] for h in d["maps"][0]) / len(d["maps"][0]) for i in range(len(d["target"]))
              for j in range(len(d["source"])))
    legend = _attr(dom, "cx", "data-legend").split("|")
    assert len(legend) == 3 and abs(float(legend[0]) - top) <= 0.05 * top and float(legend[-1]) == 0
    assert "produced each token" in dom


def test_explain_t5_target_teacher_forced(models, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    out = tmp_path / "t"
    assert cli.main(["explain", TEXT, "--model", str(models["t5"]), "--target", "a cat sat", "--no-png", "--quiet",
                     "--method", "rollout", "--out", str(out)]) == 0
    d = _data((out / "report.html").read_text(), "salience-cross-data")
    tok = models["tok"]
    tgt = tok("a cat sat")["input_ids"]
    assert d["target"] == tok.convert_ids_to_tokens(tgt) and all("EncDecAttention" in n for n in d["layer_names"])
    model = _eager(models["t5"], AutoModelForSeq2SeqLM)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([tok(TEXT)["input_ids"]]), decoder_input_ids=torch.tensor([[0] + tgt[:-1]]),
                    output_attentions=True).cross_attentions
    torch.testing.assert_close(torch.tensor(d["maps"]), torch.stack([a[0] for a in ref]), atol=2e-5, rtol=0)
    dom = _dom(tmp_path, (out / "report.html").as_uri() + "#view=cross")
    assert not _hidden(dom, "cross-sec") and _hidden(dom, "hv-panel")
    assert _attr(dom, "cx", "data-ylabels").split("|") == d["target"]


def test_explain_view_options_errors(models, tmp_path, capsys):
    base = ["explain", TEXT, "--no-png", "--quiet", "--out", str(tmp_path / "e")]
    assert cli.main(base + ["--generate", "0"]) == 2
    assert "--generate takes the number of tokens" in capsys.readouterr().err
    assert cli.main(base + ["--generate", "3", "--method", "rollout"]) == 2  # the default MiniLM is an encoder
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--generate needs a causal LM or an encoder-decoder model" in err
    assert cli.main(base + ["--model", str(models["gpt2"]), "--target", "x"]) == 2
    assert "--target is the decoder text of an encoder-decoder model" in capsys.readouterr().err
    assert cli.main(base + ["--target", "  "]) == 2 and "--target is empty" in capsys.readouterr().err
    assert cli.main(base + ["--model", str(models["gpt2"]), "--generate", "60"]) == 2  # 9 + 60 > 64 positions
    err = capsys.readouterr().err
    assert "needs 69 positions; the model" in err and "has 64. Use --generate 55 or less." in err
    # --pair on a causal LM: a note, not a silent empty tab
    assert cli.main(base + ["--model", str(models["gpt2"]), "--pair", "A dog."]) == 0
    assert "pair view: built for encoders" in capsys.readouterr().out
    assert "salience-pair-data" not in (tmp_path / "e" / "report.html").read_text()


# ------------------------------------------------------------------------------ the page, all views


def _all_views():
    from salience.interpret.generation import GenerationAttention
    from salience.interpret.pair import PairAttention
    from salience.interpret.seq2seq import CrossAttention

    torch.manual_seed(0)
    pa = PairAttention(tokens=["[CLS]", "a", "[SEP]", "b", "[SEP]"], side=[0, 0, 0, 1, 1],
                       maps=torch.softmax(torch.randn(2, 2, 5, 5), -1))
    g = GenerationAttention(tokens=["x", "y", "z", "w"], ids=[1, 2, 3, 4], prompt_length=2,
                            steps=[torch.softmax(torch.randn(2, 2, 2), -1), torch.softmax(torch.randn(2, 2, 3), -1)])
    ca = CrossAttention(source=["s0", "s1", "s2"], target=["t0", "t1"], maps=torch.softmax(torch.randn(2, 2, 2, 3), -1))
    return pa, g, ca


def test_report_with_every_view_switches_tabs(tmp_path):
    attn = torch.softmax(torch.randn(2, 2, 4, 4), -1)
    path = html.report(attn, ["the", "__JS__", "</script>", "the"], tmp_path / "r.html", views=list(_all_views()))
    page = path.read_text()
    assert page.count('<section id="pair-sec" hidden') == 1 and '<section id="gen-sec" hidden' in page
    assert re.search(r'<section id="bars-sec" hidden', page) and re.search(r'<section id="faith-sec" hidden', page)
    assert _data(page, "salience-data")["tokens"][1:3] == ["__JS__", "</script>"]  # data never taken for markup
    dom = _dom(tmp_path, path.as_uri() + "#selftest")
    st = re.search(r'<body[^>]*data-selftest="([^"]*)"', dom).group(1)
    assert st.startswith("ok") and "views=matrix:ok,head:ok,overlay:ok,pair:ok,generation:ok,cross:ok" in st, st
    assert _attr(dom, "mx", "data-xlabels").split("|") == ["the·0", "__JS__", "</script>", "the·3"]
    assert re.match(r"ab=\d+,ba=\d+,all=\d+", _attr(dom, "pair-sec", "data-selftest"))
    assert _attr(dom, "gen-sec", "data-selftest") == "keys=2,3"
    sections = {"matrix": ["mx-panel"], "head": ["hv-panel"], "pair": ["pair-sec"], "generation": ["gen-sec"],
                "cross": ["cross-sec"]}
    for key, shown in sections.items():
        dom = _dom(tmp_path, path.as_uri() + f"#view={key}")
        assert re.search(rf'<body[^>]*data-view="{key}"', dom), key
        for other in ("mx-panel", "hv-panel", "pair-sec", "gen-sec", "cross-sec"):
            assert _hidden(dom, other) == (other not in shown), (key, other)
        assert re.search(rf'<button type="button" data-view="{key}" class="on">', dom), key


def test_report_without_views_has_no_view_tabs_and_hides_empty_sections():
    attn = torch.softmax(torch.randn(1, 2, 3, 3), -1)
    page = html.report(attn, ["a", "b", "c"])
    assert "pair-sec" not in page and "gen-sec" not in page and "cross-sec" not in page
    assert '<section id="bars-sec" hidden>' in page and '<section id="faith-sec" hidden>' in page
    page = html.report(attn, ["a", "b", "c"], importances={"rollout": [0.2, 0.3, 0.5]})
    assert '<section id="bars-sec">' in page
    with pytest.raises(TypeError, match="views takes View objects"):
        html.report(attn, ["a", "b", "c"], views=[object()])
    pa = _all_views()[0]
    with pytest.raises(ValueError, match="distinct"):
        html.report(attn, ["a", "b", "c"], views=[pa, pa])


def test_whisper_style_cross_attention_equals_eager_and_joins_a_report(tmp_path):
    """An audio encoder-decoder (tiny random Whisper): encoder frames as keys through ``input_features``."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    import salience.integrations.hf as shf
    from salience.interpret.seq2seq import cross_attention

    torch.manual_seed(4)
    cfg = WhisperConfig(vocab_size=60, num_mel_bins=8, d_model=16, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                        max_source_positions=10, max_target_positions=16, decoder_start_token_id=1, pad_token_id=0,
                        eos_token_id=2, bos_token_id=1)
    model = shf.enable(WhisperForConditionalGeneration(cfg).eval())
    x, y = torch.randn(1, 8, 20), torch.tensor([[1, 5, 6, 7]])  # 20 mel frames -> 10 encoder positions
    ca = cross_attention(model, y, input_features=x)
    assert ca.maps.shape == (2, 2, 4, 10) and ca.source[0] == "frame 0" and ca.target == ["1", "5", "6", "7"]
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(input_features=x, decoder_input_ids=y, output_attentions=True).cross_attentions
    torch.testing.assert_close(ca.maps, torch.stack([a[0] for a in ref]), atol=1e-5, rtol=1e-4)
    path = html.report(torch.softmax(torch.randn(1, 2, 3, 3), -1), ["a", "b", "c"], tmp_path / "w.html", views=[ca])
    dom = _dom(tmp_path, path.as_uri() + "#view=cross")
    assert not _hidden(dom, "cross-sec") and _attr(dom, "cx", "data-xlabels").split("|") == ca.source
