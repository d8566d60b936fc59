"""What a run measures and how hard: the operations, dtypes and :class:`Settings` presets."""

from __future__ import annotations

from dataclasses import dataclass

OPS = ("forward", "backward", "fwd+bwd")
DTYPES = ("float32", "float64")
REFERENCE_GEMM_SIZE = 2048


@dataclass
class Settings:
    """How much to measure. :func:`Settings.for_mode` gives the full and ``--quick`` presets."""

    dtype: str = "float32"
    threads: int = 1
    ops: tuple = OPS
    repeat: int = 15  # timed samples per measurement, at most
    min_samples: int = 5  # ... and at least, whatever the time budget
    budget_s: float = 1.5  # no more samples once this much time went into one measurement
    min_sample_s: float = 0.02  # a sample loops over the call until it lasts this long
    extra_warmup: bool = True  # an untimed call after the first (checked) call, always
    # --quick only: a call slower than this is timed once, by its checked first call. The
    # worker's pools are already warm (tiny problems at start), so at these durations the
    # first call's extra cost (fresh pages) is a few percent; repeating torch's bilinear
    # backward (seconds per call) would take most of the run.
    first_call_is_sample_above_s: float | None = None
    gemm_repeats: int = 5  # reference GEMM samples at the start, and again at the end
    gemm_size: int = REFERENCE_GEMM_SIZE
    # Idle BLAS/OpenMP threads keep spinning for ~0.15 s after a call and would steal the
    # cores from the next backend; the harness pauses this long before switching backends.
    settle_s: float = 0.25
    # Mixed cases: rounds of (NumPy part, linmaps part, alternating step), each timed over
    # at least mixed_measure_s and mixed_min_steps steps, after a settle_s pause and
    # mixed_warmup_steps untimed steps.
    mixed_rounds: int = 5
    mixed_measure_s: float = 0.1
    mixed_min_steps: int = 5
    mixed_warmup_steps: int = 3
    # Ceiling cases: ceiling_rounds rounds of blocks (OpenBLAS's products, linmaps' step, ...,
    # one library after the other), each at least ceiling_min_steps steps and
    # ceiling_measure_s seconds of steps, after one untimed step when a step is short.
    ceiling_rounds: int = 5
    ceiling_measure_s: float = 0.1
    ceiling_min_steps: int = 3
    measure_memory: bool = True
    isolate: bool = True  # time each builtin backend in its own worker process
    worker_timeout_s: float = 1800.0
    quick: bool = False
    seed: int = 0

    @classmethod
    def for_mode(cls, quick: bool, **overrides) -> Settings:
        if quick:
            # min_samples 1: a call slower than the budget (torch's bilinear backward takes
            # seconds) gets one timed sample after its checked first call, not three.
            preset = {
                "repeat": 5,
                "min_samples": 1,
                "budget_s": 0.3,
                "min_sample_s": 0.005,
                "extra_warmup": False,
                "first_call_is_sample_above_s": 1.0,
                "gemm_repeats": 2,
                "settle_s": 0.15,
                "mixed_rounds": 3,
                "mixed_measure_s": 0.02,
                "mixed_min_steps": 3,
                "ceiling_rounds": 3,
                "ceiling_measure_s": 0.03,
                "ceiling_min_steps": 2,
                "quick": True,
            }
        else:
            preset = {}
        preset.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**preset)
        settings.min_samples = max(1, min(settings.min_samples, settings.repeat))
        return settings
