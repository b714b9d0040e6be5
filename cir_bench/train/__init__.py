"""Train stage: encoder + heads (trainer), the student distilled from a teacher (distill),
linear probes of frozen features (probe)."""
from cir_bench.train.distill import distill_student
from cir_bench.train.trainer import TrainHistory, seed_everything, train_model

__all__ = ["TrainHistory", "distill_student", "seed_everything", "train_model"]
