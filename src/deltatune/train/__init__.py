"""Training, data loading and the embedded tasks, shared by every method and full fine-tuning.

    from deltatune.train import TrainConfig, train, get_task, evaluate_task
    task = get_task("sentiment")
    model, tokenizer = task.load_model()
    result = train(model, task.train_data(tokenizer), TrainConfig(max_steps=100), collate_fn=task.collate)
    print(evaluate_task(task, model, tokenizer))
"""

from deltatune.train.checkpoint import latest_checkpoint
from deltatune.train.data import DataError, pad_collate
from deltatune.train.loop import (
    NonFiniteLossError,
    TrainConfig,
    TrainResult,
    seed_everything,
    train,
)
from deltatune.train.tasks import Task, available_tasks, evaluate_task, get_task

__all__ = [
    "DataError",
    "NonFiniteLossError",
    "Task",
    "TrainConfig",
    "TrainResult",
    "available_tasks",
    "evaluate_task",
    "get_task",
    "latest_checkpoint",
    "pad_collate",
    "seed_everything",
    "train",
]
