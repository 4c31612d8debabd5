"""The `meestral` command. Commands stay thin: the library does the work.

    main.py      the entry point: assembles the parser, runs a command with one-line errors
    common.py    shared options (backbone, exits, engine), their ExitConfig, error handling
    generate.py  generate, info
    tools.py     demo, bench
    train.py     train (exit heads; DDP / FSDP under torchrun)
    adapt.py     adapt train | export | compare
    distill.py   distill sample | train
    evaluate.py  eval, lm-eval, sweep, oracle, calibrate, report
"""
