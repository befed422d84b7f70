"""Evaluation of trained models: held-out loss, perplexity and bits per byte (perplexity.py),
zero-shot multiple choice (multiple_choice.py), L³ diagnostics and the logit lens
(diagnostics.py, logit_lens.py), and their plots and TensorBoard scalars (plots.py). The
one-command study of L³ against its baselines, which trains runs and evaluates them with
this library, is l3train/study.py. See docs/evaluation.md.

Everything here runs on the plain model (`load_checkpoint_model`), one process, no
parallelism: evaluation sets are small next to training, and a plain model gives every
checkpoint layout the same numbers.
"""
