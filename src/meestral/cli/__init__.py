"""The `meestral` command: main.py (entry point, generate/info/bench/demo), common.py (shared
options, error handling), one module per command group (train, adapt, distill, evaluate)."""
