"""The ``tune`` driver: Ray Tune experiments (tune_configs/*.yaml): grid x seeds, λ sweep and
λ calibration per trial, a tidy results table."""
from cir_bench.tune.calibrate import CalibrationResult, calibrate
from cir_bench.tune.experiment import Calibration, Experiment, Resources, trial_config

__all__ = ["Calibration", "CalibrationResult", "Experiment", "Resources", "calibrate", "trial_config"]
