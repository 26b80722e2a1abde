"""The seed job as the notebook runs it, as one process: tokenize the corpus (every time, as the
notebook does), train and record in RAM (tests/notebook_reference.py: its recorder and
InstrumentedTrainer), then ``save_file`` the recording (its cell 15). bench/trainer_bench.py times it
against ``wordystore train``. ``tests/`` must be on ``PYTHONPATH`` (trainer_bench puts it there).

    PYTHONPATH=.:tests python -m bench.notebook_job STEPS OUT BATCH
"""

from __future__ import annotations

import sys

from notebook_reference import NotebookParameters, run_notebook
from safetensors.torch import save_file

from trainer.experiment import load_corpus, load_tokenizer


def main() -> None:
    steps, out, batch = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    tokenizer = load_tokenizer()
    ids = tokenizer.encode(load_corpus())
    parameters = NotebookParameters(vocab_size=tokenizer.vocab_size, steps=steps, batch_size=batch)
    data = run_notebook(parameters, ids, out)
    save_file(data, out + "/recorded.safetensors")


if __name__ == "__main__":
    main()
