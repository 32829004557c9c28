"""Compare full fine-tuning with PEFT methods, and predict memory before training.

    from deltatune.compare import compare, estimate
    run = compare("sentiment", quick=True)           # trains, measures, writes report.md
    print(estimate("llama-7b", ["full", "lora"], batch_size=4, seq_len=512).render())
"""

from .estimate import EstimateReport, MethodEstimate, estimate
from .jobs import TrainSpec, evaluate_saved, train_method
from .measure import MemoryBreakdown, measure_training_step
from .presets import MODEL_PRESETS, RUN_PRESETS
from .runner import CompareRun, compare

__all__ = [
    "CompareRun", "EstimateReport", "MemoryBreakdown", "MethodEstimate", "MODEL_PRESETS", "RUN_PRESETS",
    "TrainSpec", "compare", "estimate", "evaluate_saved", "measure_training_step", "train_method",
]
