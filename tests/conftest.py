import os

# One CPU thread per test process (and per process a test spawns): the backbones here are tiny,
# and on a shared 2-core machine two threads per process spin against each other, making the
# suite several times slower. MEESTRAL_TEST_THREADS overrides it.
THREADS = os.environ.get("MEESTRAL_TEST_THREADS", "1")
os.environ["OMP_NUM_THREADS"] = THREADS

import pytest  # noqa: E402
import torch  # noqa: E402

from meestral.backbones.loading import random_backbone

TINY = ["mistral", "llama", "mamba2", "mamba", "mistral-sw"]


@pytest.fixture(scope="session")
def tiny():
    """Tiny random backbones by shape name, built once per session."""
    cache = {}

    def get(shape, seed=0):
        if (shape, seed) not in cache:
            cache[(shape, seed)] = random_backbone(shape, seed=seed)
        return cache[(shape, seed)]

    return get


def pytest_configure(config):
    torch.set_num_threads(int(THREADS))
    # pytest started in the background of a non-interactive shell (`nohup pytest ... &`) begins with
    # SIGINT ignored, and the runs its tests spawn would inherit that and never see the Ctrl-C the
    # fault tests send them (a run started that way keeps ignoring it, by design: interrupt.py).
    # `make test` never begins that way (make catches SIGINT, so what it runs gets the default).
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def median_softmax(bb, layer, n=48, seed=0):
    """Median max-probability of the logit lens at `layer`: a softmax threshold that makes
    roughly half the tokens exit there, whatever the random backbone's scale."""
    ids = torch.randint(3, bb.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))
    h = bb.block_outputs(bb.model(ids, output_hidden_states=True).hidden_states, [layer])[layer]
    return float(bb.logits(h).softmax(-1).max(-1).values.median())


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded backbone (SmolLM2-135M-Instruct), loaded once per session."""
    from meestral.backbones.loading import load_backbone

    return load_backbone("smollm2")


@pytest.fixture(autouse=True)
def _no_log_handlers_on_closed_streams():
    """lm-eval's CLI, run in-process by one test, leaves a logging handler on that test's captured
    stderr; once the capture is closed, any later log record prints a '--- Logging error ---'
    traceback into whatever test runs then. Drop such handlers before each test."""
    import logging

    loggers = [logging.getLogger()] + [x for x in logging.Logger.manager.loggerDict.values()
                                      if isinstance(x, logging.Logger)]
    for lg in loggers:
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler) and getattr(h.stream, "closed", False):
                lg.removeHandler(h)
    yield
