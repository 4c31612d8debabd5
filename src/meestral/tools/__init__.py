"""Tools over the library.

    bench.py           decode benchmark: full depth vs forced exits per policy, beside HF peers
    kernel_profile.py  where a decode step's device time goes, per kernel
    demo.py            the embedded backbones end to end: generation, evaluation, the report
"""
