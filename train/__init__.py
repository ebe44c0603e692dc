"""Training the embedded demo model: synthetic chat data, tokenizer, training, evaluation.

Not part of the installed ``flashmoe`` package; run the scripts from the repository root:
``python train/train.py --out OUT`` and ``python train/evaluate.py --hf OUT``.
"""
