"""Train a tiny lens in this process (argv[1]: TrainConfig fields as JSON; argv[2] == "resume" to resume).

Run by test_distributed.py under `accelerate launch`, and by test_training.py to SIGKILL a real
training process. LENSES_TEST_STEP_DELAY (seconds) slows every step so a kill lands mid-run.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("LENSES_COMPILE", "0")

from conftest import CharTokenizer  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

from lenses.train import TrainConfig, train  # noqa: E402

if __name__ == "__main__":
    from lenses.frequency import FrequencyVariant

    from lenses.models import ModelAdapter

    seen = []  # sequences this process ran through the model, per call
    real = ModelAdapter.hidden_states
    ModelAdapter.hidden_states = lambda self, ids, *a, **k: seen.append(len(ids)) or real(self, ids, *a, **k)
    import time

    import lenses.train as train_module

    delay = float(os.environ.get("LENSES_TEST_STEP_DELAY", "0"))
    batches = train_module.batch_indices
    train_module.batch_indices = lambda *a: time.sleep(delay) or batches(*a)
    kw = json.loads(sys.argv[1])
    kw["variant"] = FrequencyVariant(**kw.get("variant", {}))
    kw["resume"] = sys.argv[2:] == ["resume"]
    train(TrainConfig(**kw), model=tiny_model("llama"), tokenizer=CharTokenizer())
    rank = os.environ.get("RANK", "0")
    Path(kw["out"], f"seen-{rank}.json").write_text(json.dumps(seen))
