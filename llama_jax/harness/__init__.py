"""lm-evaluation-harness on llama_jax models: lm.py (the lm-eval model class), tasks.py (resolving and
running tasks), local_tasks/ (the shipped tasks built from the plays by build_tasks.py)."""
