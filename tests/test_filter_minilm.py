

def test_the_pipeline_with_model_density_and_minilm_hard_examples(tmp_path):
    import json

    from deepseek_rs.datafilter import FilterConfig, run_filter

    lines = [
        "The committee approved the new budget for schools and roads in the county.",
        "Heavy rain flooded the valley roads overnight and closed two bridges.",
        "A new species of frog was found in the rainforest by a team of students.",
        "The orchestra rehearsed the symphony for hours before the opening night.",
        "Farmers expect a late harvest because the spring was cold and wet.",
        "The museum will open a new wing devoted to ancient maps next year.",
    ]
    docs = [" ".join(lines[i:] + lines[:i]) + "\n" + " ".join(lines[:3]) for i in range(6)]
    docs.append("\n".join([lines[0]] * 8))  # the same sentence over and over: low semantic density
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(docs)))
    config = FilterConfig.from_mapping(
        {
            "density": {"thresholds": {"n_words": {"min": 10}, "dup_line_frac": None, "dup_line_char_frac": None,
                                       "top_2gram_char_frac": None, "top_3gram_char_frac": None,
                                       "top_4gram_char_frac": None, **{f"dup_{n}gram_char_frac": None
                                                                      for n in range(5, 11)},
                                       "word_entropy": None, "compression_ratio": None},
                        "model": {"enabled": True, "min_density": 0.5, "segments": 8}},
            "hard_examples": {"enabled": True, "embedding": "minilm", "clusters": 2, "keep_fraction": 0.5},
        }
    )
    stats = run_filter([src], tmp_path / "out", config)
    assert stats["read"] == 7 == stats["kept"] + stats["dropped"]
    assert stats["dropped_by_reason"].get("density:semantic_density<0.5") == 1
    assert "hard_examples:prototypical" in stats["dropped_by_reason"]
