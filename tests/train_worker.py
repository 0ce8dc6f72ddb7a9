"""Train a tiny lens in this process (argv[1]: TrainConfig fields as JSON; argv[2] == "resume" to resume).

Run by test_distributed.py under `accelerate launch`, and by test_training.py to SIGKILL a real
training process. LENSES_TEST_STEP_DELAY (seconds) slows every step so a kill lands mid-run; LENSES_TEST_STOP_AT=k
stops it after step k as Ctrl-C would (checkpoint, then an error). A "model_layers" field sets the
tiny model's depth.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("LENSES_COMPILE", "0")

from conftest import CharTokenizer
from tiny_models import tiny_model

from lenses.jobs.train import TrainConfig, train

if __name__ == "__main__":
    from lenses.model.adapter import ModelAdapter
    from lenses.text.frequency import FrequencyVariant

    seen = []  # sequences this process ran through the model, per call
    real = ModelAdapter.hidden_states
    ModelAdapter.hidden_states = lambda self, ids, *a, **k: seen.append(len(ids)) or real(self, ids, *a, **k)
    import time

    import lenses.jobs.train as train_module

    delay = float(os.environ.get("LENSES_TEST_STEP_DELAY", "0"))
    batches = train_module.batch_indices
    train_module.batch_indices = lambda *a: time.sleep(delay) or batches(*a)
    stop_at = int(os.environ.get("LENSES_TEST_STOP_AT", "0"))  # ask to stop (as Ctrl-C does) after this step
    if stop_at:
        loop = train_module.loop
        train_module.loop = lambda run, stop: loop(run, lambda: run.state.step >= stop_at)
    kw = json.loads(sys.argv[1])
    kw["variant"] = FrequencyVariant(**kw.get("variant", {}))
    kw["resume"] = sys.argv[2:] == ["resume"]
    layers = kw.pop("model_layers", None)
    model = tiny_model("llama", **({"num_hidden_layers": layers} if layers else {}))
    train(TrainConfig(**kw), model=model, tokenizer=CharTokenizer())
    rank = os.environ.get("RANK", "0")
    Path(kw["out"], f"seen-{rank}.json").write_text(json.dumps(seen))
