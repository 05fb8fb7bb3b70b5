from scheduler.config import SchedulerConfig
from scheduler.request import Request, RequestStatus
from scheduler.sampling_params import SamplingParams
from scheduler.scheduler import RequestTooLargeError, Scheduler
from scheduler.step import CachedRequestData, NewRequestData, StepPlan, StepResult

__all__ = ["SchedulerConfig", "Request", "RequestStatus", "SamplingParams", "Scheduler",
           "RequestTooLargeError", "StepPlan", "StepResult", "NewRequestData", "CachedRequestData"]
