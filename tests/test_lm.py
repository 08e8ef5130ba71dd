"""The reference language model (deepseek_rs.lm): the offline corpus, the model, its training
and the experiments' result format, on a corpus slice and a tiny model (seconds)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from deepseek_rs import PEAMoE, cli  # noqa: E402
from deepseek_rs.lm import corpus, experiments  # noqa: E402
from deepseek_rs.lm import model as lm_model  # noqa: E402
from deepseek_rs.lm import train as lm_train  # noqa: E402
from deepseek_rs.lm.model import TINY  # noqa: E402

LIMIT = lm_train.QUICK_LIMIT_BYTES  # bytes of text: the first documents in id order
VOCAB = corpus.VOCAB_SIZE


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    corpus.build(out, limit_bytes=LIMIT, vocab_size=VOCAB)
    return out


@pytest.fixture(scope="module")
def data(corpus_dir):
    return lm_train.Data(corpus_dir, limit_bytes=LIMIT, vocab_size=VOCAB)


# ---- corpus ------------------------------------------------------------------------------------


def test_docstrings_in_source_order_and_bad_source():
    src = textwrap.dedent('''
        """Module doc."""
        def f():
            """F's doc."""
        class C:
            """C's doc."""
            def g(self):
                pass
    ''')
    assert corpus.docstrings(src) == ["Module doc.", "F's doc.", "C's doc."]
    assert corpus.docstrings("def (:") == []


def test_deduplicate_drops_repeated_paragraphs_and_short_documents():
    para = "A paragraph long enough to be compared with the others, surely."
    docs = [
        ("a", "s", para + "\n\n" + "x" * 300),
        ("b", "s", para.upper() + "\n\n" + "y" * 300),  # the same paragraph, another case
        ("c", "s", para),  # left empty
        ("d", "s", "short"),
    ]
    out = list(corpus.deduplicate(docs))
    assert [d[0] for d in out] == ["a", "b"]
    assert out[1][2] == "y" * 300


def test_split_is_a_fixed_function_of_the_id():
    ids = [f"pkg/{i}.py" for i in range(4000)]
    splits = [corpus.split_of(i) for i in ids]
    assert splits == [corpus.split_of(i) for i in ids]
    share = {s: splits.count(s) / len(ids) for s in corpus.SPLITS}
    assert 0.87 < share["train"] < 0.93 and 0.03 < share["valid"] < 0.07 and 0.03 < share["test"] < 0.07


def test_build_is_deterministic_and_verified(corpus_dir, tmp_path):
    again = corpus.build(tmp_path / "again", limit_bytes=LIMIT, vocab_size=VOCAB)
    first = json.loads((corpus_dir / "manifest.json").read_text())
    assert again["files"] == first["files"]  # every split and the tokenizer, bit for bit
    assert first["text_bytes"] >= LIMIT and first["limit_bytes"] == LIMIT
    assert corpus.verify(tmp_path / "again") == []
    docs = [json.loads(line) for line in (tmp_path / "again" / "train.jsonl").read_text().splitlines()]
    assert docs and all(corpus.split_of(d["id"]) == "train" and d["text"] for d in docs)
    # damage is found, and ensure() rebuilds it
    with open(tmp_path / "again" / "valid.jsonl", "a") as f:
        f.write("{}\n")
    assert any("valid.jsonl" in p for p in corpus.verify(tmp_path / "again"))
    corpus.ensure(tmp_path / "again", limit_bytes=LIMIT, vocab_size=VOCAB)
    assert corpus.verify(tmp_path / "again") == []
    # a recorded manifest from the same versions must match
    bad = dict(first, files={**first["files"], "test.jsonl": {"sha256": "0" * 64}})
    (tmp_path / "expect.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="differs"):
        corpus.ensure(
            tmp_path / "again", expect=tmp_path / "expect.json", limit_bytes=LIMIT, vocab_size=VOCAB
        )


def test_iter_texts_reads_plain_and_gzip_jsonl(tmp_path):
    import gzip

    lines = [json.dumps({"id": str(i), "text": f"doc {i}"}) + "\n" for i in range(3)]
    (tmp_path / "a.jsonl").write_text("".join(lines))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("".join(lines))
    want = ["doc 0", "doc 1", "doc 2"]
    assert list(corpus.iter_texts(tmp_path / "a.jsonl")) == want
    assert list(corpus.iter_texts(tmp_path / "b.jsonl.gz")) == want


def test_sources_come_from_the_dependency_closure():
    deps = corpus.dependency_closure()
    assert {"torch", "numpy", "transformers", "tokenizers"} <= set(deps)
    assert "pytest" not in deps  # a test tool, not brought by deepseek-rs[lm]


# ---- model -------------------------------------------------------------------------------------


def test_model_is_a_patched_qwen3_moe_and_loads_without_deepseek_rs(data, tmp_path):
    m = lm_model.build(TINY, data.vocab_size, seed=0, eos_token_id=data.eos_id)
    assert type(m).__name__ == "Qwen3MoeForCausalLM"
    assert len([x for x in m.modules() if isinstance(x, PEAMoE)]) == TINY.layers
    recipe = lm_train.quick_recipe().replace(tokens=1024, batch_size=2)
    lm_train.train(m, data.stream("train"), recipe)
    lm_train.save(m, tmp_path / "ckpt", data, recipe, {})
    x = data.stream("valid")[: TINY.context][None]
    with torch.no_grad():
        want = m.eval()(input_ids=x).logits
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r}).eval()
        AutoTokenizer.from_pretrained({str(tmp_path / "ckpt")!r})
        assert not any(k.startswith("deepseek_rs") for k in sys.modules)
        with torch.no_grad():
            torch.save(m(input_ids=torch.load({str(tmp_path / "x.pt")!r})).logits, {str(tmp_path / "y.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    got = torch.load(tmp_path / "y.pt")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # and back through deepseek_rs, with another routing
    again = lm_model.load(tmp_path / "ckpt", router="top_p", top_p=0.9)
    assert lm_model.routing_of(again).rule == "top_p"


def test_training_is_deterministic_and_learns(data):
    recipe = lm_train.quick_recipe().replace(tokens=4096, batch_size=4)
    runs = []
    for _ in range(2):
        m = lm_model.build(TINY, data.vocab_size, seed=3, eos_token_id=data.eos_id)
        before = lm_train.evaluate(m, data.stream("valid"), TINY.context, 1024)
        stats = lm_train.train(m, data.stream("train"), recipe.replace(seed=3))
        after = lm_train.evaluate(m, data.stream("valid"), TINY.context, 1024)
        runs.append((stats["final_train_loss"], after["loss"]))
    assert runs[0] == runs[1]
    assert after["loss"] < before["loss"] - 0.2
    assert stats["tokens"] == 4096 and stats["steps"] == 4096 // (4 * TINY.context)


def test_expert_pairs_budget_and_progressive_routing(data):
    routing = {"rule": "top_p", "top_p": 0.9, "min_k": 1, "renormalize": True}
    recipe = lm_train.quick_recipe().replace(tokens=10**9, expert_pairs=3 * 1024 * TINY.layers, batch_size=2)
    m = lm_model.build(TINY, data.vocab_size, seed=0, eos_token_id=data.eos_id, **routing)
    stats = lm_train.train(m, data.stream("train"), recipe.replace(routing=routing))
    assert stats["expert_pairs"] >= 3 * 1024 * TINY.layers
    one_step = 2 * TINY.context * TINY.layers * TINY.num_experts  # pairs of one step at most
    assert stats["expert_pairs"] < 3 * 1024 * TINY.layers + one_step
    assert 1.0 < stats["train_experts_per_token"] <= TINY.num_experts


def test_recipe_round_trips_through_json():
    r = lm_train.reference_recipe()
    assert lm_train.Recipe.from_json(json.loads(json.dumps(r.to_json()))) == r


# ---- experiments -------------------------------------------------------------------------------


def test_pea_experiment_reports_mean_and_spread_per_arm(data):
    base = lm_train.quick_recipe().replace(tokens=1024, batch_size=2)
    arms = experiments.pea_arms(top_p=0.6, max_k=3)
    out = experiments.pea(data, base, seeds=[0, 1], arms=arms, eval_tokens=512)
    assert set(out["arms"]) == set(arms)
    k2 = out["arms"]["top_k2"]
    assert k2["valid_experts_per_token"]["values"] == [2.0, 2.0]
    assert len(k2["valid_perplexity"]["values"]) == 2 and k2["valid_perplexity"]["std"] >= 0
    matched = out["arms"]["top_p+entropy@compute"]
    assert matched["expert_pairs"]["min"] >= 2 * 1024 * TINY.layers
    assert "perplexity_change" in out["arms"]["top_p"]["vs_top_k2"]
    json.dumps(out)


def test_int8_experiment_on_a_quick_reference(data, corpus_dir, tmp_path):
    recipe = lm_train.quick_recipe().replace(tokens=2048, batch_size=2)
    ref = lm_train.ensure_reference(tmp_path / "ref", recipe, corpus_dir, limit_bytes=LIMIT, vocab_size=VOCAB)
    out = experiments.int8(data, ref, recipe, seeds=[0, 1], steps_tokens=256, eval_tokens=512, low_bits=3)
    assert {"fp32", "ptq_int8", "ptq_w3", "qat_int8", "qat_w3", "fp32_finetuned"} <= set(out["arms"])
    assert 0.5 < out["accuracy_kept"]["ptq_int8"] < 1.5
    assert len(out["arms"]["qat_int8"]["accuracy"]["values"]) == 2
    json.dumps(out)


def test_fake_quantized_weights_lie_on_the_grid():
    lin = torch.nn.Sequential(torch.nn.Linear(8, 4))
    experiments.fake_quantize_weights(lin, 3)
    w = lin[0].weight
    scale = lin[0].parametrizations.weight.original.abs().amax(-1, keepdim=True) / 3
    q = w / scale
    torch.testing.assert_close(q, q.round())
    assert q.abs().max() <= 3


def test_train_reference_command(corpus_dir, tmp_path, capsys):
    argv = ["train-reference", "--quick", "--corpus", str(corpus_dir), "--out", str(tmp_path / "m")]
    argv += ["--tokens", "1024", "--batch-size", "2", "-q"]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["train"]["tokens"] == 1024 and out["valid"]["perplexity"] > 1
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m" / "tokenizer.json").is_file()
    assert corpus.verify(corpus_dir) == []
    assert cli.main(argv) == 0  # the same recipe: kept
    assert "already holds" in capsys.readouterr().err


def test_filter_experiment_trains_on_raw_and_filtered_text(data, tmp_path):
    base = lm_train.quick_recipe().replace(tokens=512, batch_size=2)
    arms = {"density": experiments.FILTER_ARMS["density"]}
    out = experiments.datafilter(data, base, tmp_path, seeds=[0], arms=arms, eval_tokens=256)
    raw, dens = out["arms"]["raw"], out["arms"]["density"]
    assert dens["runs"][0]["train_stream_tokens"] < raw["runs"][0]["train_stream_tokens"]  # it dropped some
    assert dens["filter"]["kept"] < dens["filter"]["read"]
    assert {"raw_valid_perplexity", "clean_valid_perplexity"} <= set(raw)
    assert "raw_valid_perplexity" in dens["vs_raw"]
    json.dumps(out)
