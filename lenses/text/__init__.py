"""Text as a model reads it: corpora, datasets (facts, questions, tasks), chat templates, the input convention
(BOS) and token frequencies."""
