"""Pipeline parallelism: partitioning, schedules as data, and the runtime that runs them."""
from .partition import PartitionError, balance
from .runtime import Pipeline, PipelineError, PipelineTimeout
from .schedules import SCHEDULES, Action, Schedule, ScheduleError, build_schedule, theory_bubble

__all__ = ["Pipeline", "PipelineError", "PipelineTimeout", "Schedule", "ScheduleError", "Action", "build_schedule",
           "theory_bubble", "SCHEDULES", "balance", "PartitionError"]
