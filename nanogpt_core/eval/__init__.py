"""Evaluation: the Evaluator, eval suites, scoring checkpoints, comparing runs."""
