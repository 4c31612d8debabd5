"""Evaluation: lm-eval model class, offline task suite, sweeps, oracle, calibration."""
