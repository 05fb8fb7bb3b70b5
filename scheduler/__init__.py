from scheduler.clock import Clock, MonotonicClock, VirtualClock
from scheduler.config import SchedulerConfig
from scheduler.engine_core import EngineCore, EngineCoreOutput, Executor
from scheduler.request import Request, RequestStatus
from scheduler.sampling_params import SamplingParams
from scheduler.scheduler import NoKVSpaceError, RequestTooLargeError, Scheduler
from scheduler.step import CachedRequestData, NewRequestData, Segment, StepPlan, StepResult

__all__ = ["Clock", "MonotonicClock", "VirtualClock", "SchedulerConfig", "EngineCore", "EngineCoreOutput",
           "Executor", "Request", "RequestStatus", "SamplingParams", "Scheduler", "RequestTooLargeError",
           "NoKVSpaceError", "StepPlan", "StepResult", "NewRequestData", "CachedRequestData", "Segment"]
