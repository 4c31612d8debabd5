"""Generation with early exits: the decoder and what it is made of.

    decoder.py         EarlyExitDecoder: prompts in, Generations (tokens, per-token accounting) out
    config.py          ExitConfig: heads, thresholds, state policy, backlog, exit output (the one carrier)
    heads.py           exit heads and training-free confidence measures
    exit_rule.py       leave at the first exit point whose confidence is above its threshold
    sampling.py        greedy / temperature / top-k / top-p, speculative acceptance's pieces
    policy.py          the batch in flight, a step's outcome, the policy base
    slot_policies.py   copy, propagate: one slot per step
    catchup.py         catchup: exited tokens wait and the next deep token carries them (exact)
    verify.py          verify: catch-up that checks every early token (lossless)
    schedule.py        a row's catch-up schedule and the step logs it writes (scoring uses it too)
    engine.py          everything the policies ask of the backbone, block by block
    graph_engine.py    the same, each call captured once per shape as a CUDA graph
    accounting.py      what each token cost: layers, FLOPs, weight bytes, wall-clock
"""

from meestral.decoding.config import ExitConfig
from meestral.decoding.decoder import EarlyExitDecoder, Generation
from meestral.decoding.heads import ExitHeads
from meestral.decoding.sampling import SamplingOptions

__all__ = ["EarlyExitDecoder", "ExitConfig", "ExitHeads", "Generation", "SamplingOptions"]
