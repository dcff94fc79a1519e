"""The trainer service: a domain specialist trained from a team's own labelled batches.

``train.train_specialist`` is the entry point (served as the ``kiban.trainer.train_specialist``
task by ``tasks.py``; ``kiban train`` sends it). One module per step: ``selection`` (the
training side of the split protocol), ``head`` (a projection on stored embeddings),
``compose`` (base + head as one ONNX graph), ``finetune`` (the base's own weights),
``images`` (decode + preprocess like the encoder), ``provenance`` (the card's training record).
Cheap to import: torch loads inside the functions that train.
"""
