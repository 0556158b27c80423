"""Evaluation: perplexity and bits per byte, multiple choice by log-likelihood, generative tasks with
verifiers (`ouvert eval`, run.py), and an adapter that lets EleutherAI's lm-eval run ouvert models
(lm_eval.py). The model-level pieces both use live in score.py."""

from ouvert.eval.run import EvalConfig, evaluate, run
from ouvert.eval.tasks import Task, TaskError, load_task

__all__ = ["EvalConfig", "Task", "TaskError", "evaluate", "load_task", "run"]
