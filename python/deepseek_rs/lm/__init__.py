"""The reference MoE language model: an offline corpus of real text (:mod:`.corpus`), a
Qwen3-MoE causal LM whose MoE blocks run on :class:`~deepseek_rs.PEAMoE` (:mod:`.model`), its
training recipe (:mod:`.train`), and the article's quality claims measured on it
(:mod:`.experiments`). See docs/reference-model.md."""
